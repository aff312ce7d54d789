// ZeRO stages 2 and 3 per layer, over the whole DP × SP world of W ranks (every rank holds the
// same model and each saw different tokens): gradients reduce-scattered layer by layer as soon
// as the layer's backward is done (stages 2 and 3), and at stage 3 the layer parameters sharded
// at rest and all-gathered per layer just before the layer runs. No full-size layer gradient
// buffer exists at either stage, and no full-size layer parameter buffer at stage 3.
//
// Layout. Each layer's 12 tensors (LayerTensors, llm.c order) form one layer block; each tensor
// starts at a multiple of kAlign elements in it, and the block is padded with zeros to W · S
// (S, the shard, also a multiple of kAlign). Rank r owns [r·S, (r+1)·S) of every layer's block:
//   master [L, S] fp32, m [L, S], v [L, S], gradient shard [L, S] (fp32)
//   compute shard [L, S] in the model's compute dtype (on the CPU fp32: the master itself; on
//     the GPU the bf16 copy that adamw_update's param_lowp writes)
//   stage 3: two layer buffers [W·S] (compute dtype), used alternately: layer l lives in
//     buffer l % 2, so the gather of the next layer (l + 1 in forward, l - 1 in backward) can
//     run while layer l computes; stage 2: one, used only to publish updated parameters
//   one layer gradient buffer [W·S] (fp32) that the model's backward accumulates layer l into
//     (two with overlap_comm, layer l in l % 2: see Streams)
// The non-layer tensors (wte, wpe, lnfw, lnfb: the "rest") stay whole in the model on every rank,
// parameters and gradients (GPTRunShape::sharded_layer_*), as a contiguous block padded to W · R;
// their master, m, v and summed gradient are sharded ([R] per rank) as at ZeRO 2.
//
// Devices. On the CPU everything is fp32 host memory and the model's one parameter buffer is
// also what forward reads. On cuda everything above is device memory; the model is built with
// GPTRunShape::master_weights = false (it holds only the bf16 compute copy: of every tensor at
// stage 2, of the rest at stage 3) because the fp32 master weights are the shards here; the
// layer buffers and the published parameters are bf16, so the parameter all-gathers move 2 bytes
// per parameter; the gradients stay fp32 (the model's backward accumulates fp32 weight
// gradients). `world` is then a device communicator (NCCL, or MPI staged through pinned host
// memory), and every host value (the gradient norm's scalar) and the checkpoint staging go
// through `host_world` (MPI on host memory; on the CPU the same communicator as world).
//
// One optimizer step (the trainer):
//   zero_grad; per micro-batch: forward (before_forward(l): gather l, prefetch l + 1), backward
//   (before_backward(l): gather l, prefetch l - 1, zero the layer gradient buffer and put this
//   rank's gradient shard l into its own slot of it; after_backward(l): reduce_scatter(sum) it
//   straight into the gradient shard l: the slot's old value is summed in, so the micro-batches
//   accumulate without an add kernel); reduce_gradients: reduce_scatter the rest's gradient, the
//   squared norm of all shards (one scalar all_reduce over host_world); update: AdamW on this
//   rank's shards (weight decay per tensor, across shard boundaries; on cuda the bf16 compute
//   shard written in the same pass), then publish: stage 3 marks the layer buffers stale (the
//   next forward gathers), stage 2 all-gathers each layer's compute shards into the model's
//   whole compute parameters; the rest is all-gathered into the model at both stages.
//
// Streams. By default (runtime.overlap_comm false, and always on the CPU) every collective on
// `world` is enqueued on the model context's stream (the trainer sets Communicator::set_stream to
// it), after the kernels that wrote its input and before those that read its output, so one
// stream orders everything and no event is needed; the host waits only in reduce_gradients
// (sum_squares) and in the checkpoint / init paths. The price: the prefetch of layer l ± 1 runs
// after layer l's kernels, not beside them, and backward waits for each layer's reduce-scatter.
//
// overlap_comm (cuda only): the per-layer collectives run on a communication stream owned here
// (comm/comm_stream.h; created once, with its events). world_ is switched to it (set_stream) for
// the duration of each per-layer collective and back to the model stream right after, so every
// other collective (reduce_gradients, publish, the Ulysses all-to-alls on their own
// communicator) is unchanged.
// Ordering, all by events (no host wait; nothing allocated in the step):
//   model -> comm: before each collective on the comm stream, an event recorded on the model
//     stream at that moment, which the comm stream waits on. The hooks run between layers, so
//     it covers every kernel enqueued so far: the last reader of the target layer buffer (layer
//     l - 1 when prefetching l + 1 in before_forward(l); l + 1 when prefetching l - 1 in
//     before_backward(l)), the update that wrote the compute shards, the layer's gradients.
//   stage 3 gathers: gathered[b] recorded on the comm stream after the gather into buffer b; the
//     model stream waits on it in before_forward / before_backward before layer l (buffer l % 2)
//     runs. The gather of l + 1 (forward) / l - 1 (backward) is issued before layer l runs, so it
//     overlaps layer l's compute; the first layer's gather is waited on at once.
//   gradients: two layer gradient buffers, layer l in l % 2. after_backward(l) reduce-scatters
//     buffer l % 2 on the comm stream (after the model -> comm event) and records reduced[l % 2];
//     before_backward(l) makes the model stream wait on reduced[l % 2] (layer l + 2's
//     reduce-scatter, the last reader of that buffer) before zeroing it, so layer l + 1's
//     reduce-scatter runs under layer l's backward. reduce_gradients first makes the model stream
//     wait for everything on the comm stream (join), so the norm and the update see every shard.
// Cost: one more [W·S] fp32 layer gradient buffer (stage 2 and 3). With NCCL the collectives
// overlap; with the staged MPI backend each collective blocks the host anyway, and its pinned
// buffers are shared by both streams, so after each comm-stream collective the host waits for
// the comm stream (its last host-to-device copy): correct, no overlap.
//
// Checkpoints hold the whole parameters, m and v in llm.c order, as at every stage: gather_full
// collects them on rank 0, scatter_full distributes them (both through host memory over
// host_world), so any stage resumes any other.
#pragma once
#include <array>
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

// Where everything sits for a model shape on W ranks (also what `ulysses estimate` counts).
struct LayerShardLayout {
  // elements: 256 B in bf16, 512 B in fp32. 256 B, because cuBLASLt's algorithm choice is made
  // (and cached) per pointer alignment up to 256 B (kernels/cuda/matmul.cpp): a layer's weights
  // gathered here then run the same GEMMs as the model's own compute copy at ZeRO 0 / 1
  static constexpr int64_t kAlign = 128;
  int world = 1;
  std::array<int64_t, kNumLayerTensors> offset{};  // each layer tensor's start in a layer block
  std::array<int64_t, kNumLayerTensors> numel{};   // its elements (one layer)
  int64_t shard = 0;                               // S
  int64_t block() const { return shard * world; }  // W · S, padding included
  // the rest: wte, wpe, lnfw, lnfb contiguous (ParameterTensors 0, 1, 14, 15)
  static constexpr std::array<int, 4> kRestTensors = {0, 1, 14, 15};
  std::array<int64_t, 4> rest_offset{}, rest_numel{};
  int64_t rest_shard = 0;                                    // R
  int64_t rest_padded() const { return rest_shard * world; }  // W · R
  static LayerShardLayout make(const GPTShape& s, int world_size);
};

class LayerShardedZero : public LayerHooks {
 public:
  // model: built with run.sharded_layer_grads (stage 2) or also sharded_layer_params (stage 3)
  // and run.flat_multiple = W (on cuda also master_weights = false); installs itself as the
  // model's LayerHooks. world: all ranks, on the model's memory (a device communicator on cuda,
  // its stream the model's); host_world: the same ranks on host memory (null: world is on host
  // memory already). overlap_comm: runtime.overlap_comm, cuda only (see Streams above).
  LayerShardedZero(const TrainConfig& cfg, GPT& model, int stage, Communicator& world,
                   Communicator* host_world = nullptr, bool overlap_comm = false);
  ~LayerShardedZero() override;
  LayerShardedZero(const LayerShardedZero&) = delete;
  LayerShardedZero& operator=(const LayerShardedZero&) = delete;

  int stage() const { return stage_; }
  bool overlap_comm() const { return overlap_ != nullptr; }
  const LayerShardLayout& layout() const { return lay_; }

  // GPT-2 init (parameter_init_values, the same values as GPT::init_weights): this rank keeps its
  // shards (built in host memory, copied over once), then the parameters are published to the
  // model. Collective.
  void init_weights(uint64_t seed);

  // Zeroes the gradient shards (call with model.zero_grad() at the start of a step).
  void zero_grad();
  // After the micro-batches: reduce-scatters the rest's gradient (model.grads_padded()) into its
  // shard; returns the squared L2 norm of the summed gradient (identical on every rank).
  double reduce_gradients();
  // AdamW on this rank's shards, then publish the parameters (see above). As AdamW::update.
  void update(float lr, float grad_scale, int t);

  // Checkpoints (collective). gather_full: rank 0's params, m, v (n parameters each, llm.c order)
  // are filled; other ranks pass null; with_state = false gathers the parameters only.
  // scatter_full: rank 0 passes them (m, v ignored without with_state: then they are zeroed),
  // every rank keeps its shards and the model gets the parameters. Both stage one layer at a
  // time through host memory over host_world; scatter_full publishes through the model's rest
  // gradient buffer, so call them between steps.
  void gather_full(float* params, float* m, float* v, bool with_state);
  void scatter_full(const float* params, const float* m, const float* v, bool with_state);

  // bytes this rank holds here (beyond the model's own buffers), for the log and the tests
  size_t parameter_bytes() const;  // master + compute shards + layer buffers
  size_t gradient_bytes() const;   // gradient shards + layer gradient buffer
  size_t state_bytes() const;      // m, v

  // LayerHooks
  void before_forward(int l) override;
  void before_backward(int l) override;
  void after_backward(int l) override;
  LayerTensors layer_params(int l) override;
  LayerTensors layer_grads(int l) override;

 private:
  // views of the 12 tensors of one layer block laid out in `block` ([W·S] of any dtype)
  LayerTensors views(Tensor block) const;
  void gather_layer(int l);        // into buffer l % 2 unless it holds l already
  void refresh_compute_shards();   // compute = master (after init / load)
  void publish();                  // the updated parameters to the model (see above)
  // this rank's slice [r·S, (r+1)·S) of a [W·S] block
  Tensor own_slice(Tensor block) const;
  // the gradient buffer layer l's backward accumulates into: l % 2 with overlap_comm, else 0
  Tensor& grad_buffer(int l) { return layer_grad_[size_t(overlap_ ? l % 2 : 0)]; }
  // overlap_comm: the model stream waits for layer l's gather (no-op without)
  void wait_gathered(int l);
  // overlap_comm: the model stream waits for everything enqueued on the comm stream (no-op without)
  void join_comm();

  TrainConfig cfg_;
  GPT& model_;
  int stage_;
  Communicator& world_;
  Communicator& host_world_;
  ops::Context& ctx_;
  std::vector<ParameterSpec> specs_;
  LayerShardLayout lay_;
  int L_ = 0;
  DType param_dtype_ = DType::f32;  // the model's compute dtype (bf16 on cuda)
  Arena arena_;
  Tensor master_, compute_, m_, v_, grad_shard_;          // [L, S]
  Tensor rest_master_, rest_m_, rest_v_, rest_grad_;      // [R]
  Tensor rest_compute_;                                   // [R] in param dtype (aliases rest_master_ if fp32)
  std::array<Tensor, 2> layer_buf_;                       // [W·S] compute dtype (stage 2: one)
  std::array<int, 2> resident_ = {-1, -1};                // layer held by each buffer
  std::array<Tensor, 2> layer_grad_;                      // [W·S] fp32 (one without overlap_comm)
  int grad_layer_ = -1;                                   // layer whose backward is running
  // overlap_comm: the comm stream and its events (comm/comm_stream.h); null without. Declared
  // after arena_, so it is destroyed first: its destructor waits for the comm stream, which may
  // still be reading or writing the arena.
  std::unique_ptr<CommStream> overlap_;
};

}  // namespace ulysses
