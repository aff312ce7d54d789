#include "core/optimizer.h"

#include <cmath>

#include "core/base/error.h"

namespace ulysses {

double learning_rate(const TrainConfig& t, int step) {
  if (t.lr_schedule == "constant") return step < t.warmup_steps ? t.lr * (step + 1) / t.warmup_steps : t.lr;
  if (step < t.warmup_steps) return t.lr * (step + 1) / t.warmup_steps;
  const double min_lr = t.lr * t.min_lr_ratio;
  const int decay_steps = t.max_steps - t.warmup_steps;
  if (decay_steps <= 0) return t.lr;
  const double progress = std::min(1.0, double(step - t.warmup_steps) / decay_steps);
  const double coeff = t.lr_schedule == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return min_lr + coeff * (t.lr - min_lr);
}

AdamW::AdamW(const TrainConfig& cfg, const GPTShape& shape, Device device)
    : cfg_(cfg), specs_(parameter_specs(shape)), arena_("optimizer", device) {
  const int64_t n = num_parameters(shape);
  const size_t m_off = arena_.reserve(size_t(n) * 4);
  const size_t v_off = arena_.reserve(size_t(n) * 4);
  arena_.allocate();
  m_ = arena_.tensor(m_off, {n}, DType::f32);
  v_ = arena_.tensor(v_off, {n}, DType::f32);
}

void AdamW::update(ops::Context& ctx, Tensor params, Tensor grads, float lr, float grad_scale, int t,
                   Tensor compute) {
  const bool lowp = !compute.empty() && compute.data != params.data;
  // tensor by tensor, so biases and LayerNorm parameters skip the weight decay
  int64_t off = 0;
  for (const ParameterSpec& s : specs_) {
    const int64_t n = s.numel();
    if (n > 0) {
      const float wd = s.weight_decay ? float(cfg_.weight_decay) : 0.f;
      ops::adamw_update(ctx, params.rows(off, n), grads.rows(off, n), m_.rows(off, n), v_.rows(off, n), lr,
                        float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), wd, grad_scale, t,
                        lowp ? compute.rows(off, n) : Tensor());
    }
    off += n;
  }
}

}  // namespace ulysses
