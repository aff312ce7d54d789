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
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/arena.h"
#include "core/config.h"
#include "core/gpt.h"
#include "kernels/ops.h"

namespace ulysses {

class ZeroAdamW {
 public:
  // world: all ranks (the optimizer state is sharded over all of them)
  ZeroAdamW(const TrainConfig& cfg, const GPTShape& shape, int stage, Communicator& world, Device device);

  // elements of the padded flat buffers for n parameters on a world of `world_size`
  static int64_t padded_count(int64_t n, int world_size);

  int stage() const { return stage_; }
  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_size() const { return shard_size_; }

  // Sums this rank's gradients (grads_padded: [n_padded], this rank's sum over its tokens) over
  // the world and returns the squared L2 norm of the summed gradient (identical on every rank).
  // Stages 0, 1: grads_padded holds the sum afterwards; stage 2: only the shard does (internal).
  double reduce_gradients(ops::Context& ctx, Tensor grads_padded);

  // AdamW on this rank's shard (everything at stage 0), then the parameters are all-gathered.
  // grad_scale and t as AdamW::update.
  void update(ops::Context& ctx, Tensor params_padded, Tensor grads_padded, float lr, float grad_scale, int t);

  // The whole m and v (n parameters each) for a checkpoint: collective; rank 0's buffers are
  // filled, other ranks may pass null.
  void gather_state(float* m, float* v);
  // The reverse: rank 0 passes the whole m and v, every rank keeps its shard. Collective.
  void scatter_state(const float* m, const float* v);

  // this rank's m and v ([S]; the whole padded buffer at stage 0)
  Tensor m() const { return m_; }
  Tensor v() const { return v_; }

 private:
  TrainConfig cfg_;
  std::vector<ParameterSpec> specs_;
  int stage_;
  Communicator& world_;
  int64_t n_ = 0, n_padded_ = 0, shard_begin_ = 0, shard_size_ = 0;
  Arena arena_;
  Tensor m_, v_, grad_shard_;  // grad_shard_: stage 2 only
};

}  // namespace ulysses
