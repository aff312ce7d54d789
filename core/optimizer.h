// AdamW with decoupled weight decay (matrices and embeddings only), the learning-rate schedule
// (linear warmup, then cosine / linear decay to lr * min_lr_ratio, or constant), and clipping by
// global gradient norm. The state (m, v) lives in one arena the size of the parameters.
#pragma once
#include <cstdint>

#include "core/base/arena.h"
#include "core/config.h"
#include "core/gpt.h"
#include "kernels/ops.h"

namespace ulysses {

double learning_rate(const TrainConfig& t, int step);  // step counts from 0

class AdamW {
 public:
  AdamW(const TrainConfig& cfg, const GPTShape& shape, Device device);

  // One update. grads hold the SUM over the global batch of the per-token loss gradients;
  // grad_scale (1 / token count, times the clip factor) turns them into the clipped mean.
  // t: the optimizer step, from 1. compute (optional): the model's compute copy of `params`
  // (bf16 on cuda, GPT::compute_params_padded), written in the same pass; ignored when it is
  // `params` itself (cpu).
  void update(ops::Context& ctx, Tensor params, Tensor grads, float lr, float grad_scale, int t,
              Tensor compute = Tensor());

  Tensor m() const { return m_; }
  Tensor v() const { return v_; }

 private:
  TrainConfig cfg_;
  std::vector<ParameterSpec> specs_;
  Arena arena_;
  Tensor m_, v_;
};

}  // namespace ulysses
