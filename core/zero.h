// ZeRO over the whole DP × SP world (every rank holds the same parameters and each saw different
// tokens): AdamW whose state and, from stage 2, gradients are sharded over the W world ranks.
//
// The flat parameter / gradient buffers (llm.c order, core/gpt.h) are padded with zeros to
// n_padded = W · S elements; rank r owns the shard [r·S, (r+1)·S).
//   stage 0  all_reduce(sum) the gradients; every rank updates everything (m, v whole)
//   stage 1  all_reduce(sum) the gradients; each rank updates its shard with its m, v [S], then
//            all_gather the parameters
//   stage 2  reduce_scatter(sum) the gradients straight into a shard [S]; the grad norm is the
//            all_reduce of the shards' squared sums (one scalar); update the shard, all_gather
// Weight decay stays per tensor: a shard crosses tensor boundaries, so the update walks the
// parameter tensors and runs AdamW on each one's intersection with the shard.
// The trainer runs stages 0 and 1 here. Stages 2 and 3 run per layer (LayerShardedZero,
// core/zero3.h: gradients reduce-scattered as each layer's backward ends, so no full gradient
// buffer exists; at 3 also the parameters sharded). Stage 2 here, on the whole gradient buffer
// after backward, is the flat-buffer variant (it saves optimizer memory and traffic, not the
// gradient buffer); tests compare both against stage 0.
//
// On cuda: m, v (and the stage-2 gradient shard) are fp32 device memory; `world` is a device
// communicator (NCCL, or MPI staged through host memory) and `host_world` an MPI communicator
// over the same ranks for host values (the stage-2 norm scalar, checkpoint state). AdamW writes
// the bf16 compute copy (GPT::compute_params_padded) of the range it updates in the same pass
// (param_lowp). Stages 1 and 2 then all-gather the fp32 master weights, which leaves the compute
// copy of the other shards stale: the caller refreshes it (GPT::refresh_compute_params, one cast
// over the buffer). Gathering the master weights rather than only the bf16 copy keeps every rank's
// master weights whole, as on the CPU, so checkpoints, llm.c export and the sampler read them
// on any rank without another collective; the cast costs one pass over 6 bytes per parameter.
//
// runtime.overlap_comm at stages 0 and 1 (cuda only): OverlappedGradientAllReduce below, as the
// model's LayerHooks, all-reduces each layer's gradients on a communication stream while the
// layers below it run their backward, in the last micro-batch of a step only; reduce_gradients
// then all-reduces what is left (wte, wpe, lnfw, lnfb, the padding) and the norm follows as without.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "comm/comm_stream.h"
#include "comm/communicator.h"
#include "core/base/arena.h"
#include "core/config.h"
#include "core/gpt.h"
#include "kernels/ops.h"

namespace ulysses {

class OverlappedGradientAllReduce;

class ZeroAdamW {
 public:
  // world: all ranks (the optimizer state is sharded over all of them), on `device`'s memory;
  // host_world: the same ranks on host memory (null: world is on host memory already)
  ZeroAdamW(const TrainConfig& cfg, const GPTShape& shape, int stage, Communicator& world, Device device,
            Communicator* host_world = nullptr);

  // elements of the padded flat buffers for n parameters on a world of `world_size`
  static int64_t padded_count(int64_t n, int world_size);

  int stage() const { return stage_; }
  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_size() const { return shard_size_; }

  // Sums this rank's gradients (grads_padded: [n_padded], this rank's sum over its tokens) over
  // the world and returns the squared L2 norm of the summed gradient (identical on every rank).
  // Stages 0, 1: grads_padded holds the sum afterwards; stage 2: only the shard does (internal).
  // overlapped (stages 0, 1; runtime.overlap_comm): the layers were all-reduced during the last
  // backward by these hooks; only the rest is left (OverlappedGradientAllReduce::finish).
  double reduce_gradients(ops::Context& ctx, Tensor grads_padded, OverlappedGradientAllReduce* overlapped = nullptr);

  // AdamW on this rank's shard (everything at stage 0), then (stages 1, 2) the parameters are
  // all-gathered. grad_scale and t as AdamW::update. compute_padded: the model's compute copy
  // (GPT::compute_params_padded); when it is another buffer than params_padded (bf16 on cuda)
  // AdamW writes this rank's range of it too. Stages 1, 2 on cuda: refresh the rest afterwards
  // (GPT::refresh_compute_params), see above.
  void update(ops::Context& ctx, Tensor params_padded, Tensor grads_padded, float lr, float grad_scale, int t,
              Tensor compute_padded = Tensor());

  // The whole m and v (n parameters each, host memory) for a checkpoint: collective; rank 0's
  // buffers are filled, other ranks may pass null. Staged through host memory on cuda.
  void gather_state(ops::Context& ctx, float* m, float* v);
  // The reverse: rank 0 passes the whole m and v (host), every rank keeps its shard. Collective.
  void scatter_state(ops::Context& ctx, const float* m, const float* v);

  // this rank's m and v ([S]; the whole padded buffer at stage 0)
  Tensor m() const { return m_; }
  Tensor v() const { return v_; }

 private:
  TrainConfig cfg_;
  std::vector<ParameterSpec> specs_;
  int stage_;
  Communicator& world_;
  Communicator& host_world_;
  int64_t n_ = 0, n_padded_ = 0, shard_begin_ = 0, shard_size_ = 0;
  Arena arena_;
  Tensor m_, v_, grad_shard_;  // grad_shard_: stage 2 only
};

// ZeRO 0 / 1 with runtime.overlap_comm (cuda only): the gradient all-reduce, layer by layer, on a
// communication stream of its own, overlapped with the backward of the layers below.
//
// What. In the LAST micro-batch of a step only (earlier ones only accumulate; set_last_micro_batch
// says which), after_backward(l) all-reduces (sum, in place) layer l's 12 gradient slices
// (GPT::layer_grads(l): one contiguous [numel / L] piece of each stacked fp32 tensor in the
// model's flat buffer). Nothing writes them again in that backward: the LM head writes wte's
// gradient and the final LayerNorm lnfw / lnfb's before the layers, embedding_backward writes
// wte / wpe after them, and layer l - 1 writes only its own slices. finish() (called by
// ZeroAdamW::reduce_gradients) all-reduces the rest of the flat buffer on the model stream: the
// two ranges [0, ln1w) = wte, wpe and [lnfw, n_padded) = lnfw, lnfb, zero padding. Every element
// of the buffer is then summed over the world exactly once, as the whole-buffer all-reduce does
// (with 2 ranks bitwise the same: a sum of two is commutative). No memory beyond the model's.
//
// Streams (comm/comm_stream.h), created once in the constructor (no allocation, no host wait in
// the step):
//   model -> comm: after_backward(l) makes the comm stream follow the model stream (which holds
//     every kernel of layer l's backward, already enqueued); then the world communicator is
//     switched to the comm stream for the 12 all-reduces and back to the model stream right after
//     (as LayerShardedZero does, core/zero3.h "Streams"), so every other collective on it (the
//     rest here, ZeRO 1's all-gather) stays on the model stream.
//   comm -> model: finish() first makes the model stream wait for everything on the comm stream
//     (join), then all-reduces the rest on the model stream; sum_squares and the update come
//     after on the model stream and see the whole summed buffer. The next step's zero_grad is on
//     the model stream too, after that wait.
//   staged MPI (every collective blocks the host; its pinned buffers are shared by both streams):
//     after each comm-stream all-reduce the host waits for the comm stream (its host-to-device
//     copy of the result), as LayerShardedZero does: correct, no overlap. NCCL overlaps.
class OverlappedGradientAllReduce : public LayerHooks {
 public:
  // Installs itself as the model's LayerHooks (stages 0 / 1 have no other). model: on cuda, not
  // built with sharded layers; world: all ranks, a device communicator whose stream is the model's.
  OverlappedGradientAllReduce(GPT& model, Communicator& world);
  ~OverlappedGradientAllReduce() override;  // waits for the comm stream, uninstalls
  OverlappedGradientAllReduce(const OverlappedGradientAllReduce&) = delete;
  OverlappedGradientAllReduce& operator=(const OverlappedGradientAllReduce&) = delete;

  // before each micro-batch's forward_backward: true for the step's last (the one to reduce)
  void set_last_micro_batch(bool last) { last_micro_batch_ = last; }
  // after the micro-batches: the rest all-reduced, the model stream after the comm stream; the
  // model's grads_padded() then holds the sum over the world. Checks that every layer was reduced.
  void finish();

  // LayerHooks
  void before_forward(int) override {}
  void before_backward(int) override {}
  void after_backward(int l) override;
  LayerTensors layer_params(int l) override;  // never asked (the model holds its layers)
  LayerTensors layer_grads(int l) override;

 private:
  GPT& model_;
  Communicator& world_;
  int64_t layers_begin_ = 0, layers_end_ = 0;  // [ln1w, lnfw) in the flat buffer: the 12 stacked tensors
  bool last_micro_batch_ = false;
  int layers_reduced_ = 0;  // in this step's last backward
  std::unique_ptr<CommStream> comm_;  // destroyed first: waits for the all-reduces in flight
};

}  // namespace ulysses
