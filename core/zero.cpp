// ZeRO stages 0-2 over the world communicator (see core/zero.h).
#include "core/zero.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace ulysses {

int64_t ZeroAdamW::padded_count(int64_t n, int world_size) {
  const int64_t w = std::max(1, world_size);
  return (n + w - 1) / w * w;
}

ZeroAdamW::ZeroAdamW(const TrainConfig& cfg, const GPTShape& shape, int stage, Communicator& world, Device device)
    : cfg_(cfg), specs_(parameter_specs(shape)), stage_(stage), world_(world), arena_("optimizer", device) {
  if (stage < 0 || stage > 2)
    throw_user_error("parallel.zero_stage = {}: ZeroAdamW shards the flat buffers (stages 0, 1, 2); stage 3 "
                     "shards per layer (LayerShardedZero, core/zero3.h)",
                     stage);
  n_ = num_parameters(shape);
  const int W = world.size();
  n_padded_ = padded_count(n_, W);
  if (stage == 0) {
    shard_begin_ = 0;
    shard_size_ = n_padded_;
  } else {
    shard_size_ = n_padded_ / W;
    shard_begin_ = int64_t(world.rank()) * shard_size_;
  }
  const size_t m_off = arena_.reserve(size_t(shard_size_) * 4);
  const size_t v_off = arena_.reserve(size_t(shard_size_) * 4);
  const size_t g_off = stage == 2 ? arena_.reserve(size_t(shard_size_) * 4) : 0;
  arena_.allocate();
  m_ = arena_.tensor(m_off, {shard_size_}, DType::f32);
  v_ = arena_.tensor(v_off, {shard_size_}, DType::f32);
  if (stage == 2) grad_shard_ = arena_.tensor(g_off, {shard_size_}, DType::f32);
}

double ZeroAdamW::reduce_gradients(ops::Context& ctx, Tensor grads_padded) {
  ULYSSES_ASSERT(grads_padded.numel() == n_padded_, "gradients of {} elements, expected the padded {}",
                 grads_padded.numel(), n_padded_);
  if (stage_ < 2) {
    world_.all_reduce(grads_padded.data, grads_padded.data, size_t(n_padded_), DType::f32, ReduceOp::sum);
    return ops::sum_squares(ctx, grads_padded);  // the padding is 0
  }
  // [W · S] -> this rank's summed shard [S]
  world_.reduce_scatter(grads_padded.data, grad_shard_.data, size_t(shard_size_), DType::f32, ReduceOp::sum);
  double squares = ops::sum_squares(ctx, grad_shard_);
  world_.all_reduce(&squares, &squares, 1, DType::f64, ReduceOp::sum);
  return squares;
}

void ZeroAdamW::update(ops::Context& ctx, Tensor params_padded, Tensor grads_padded, float lr, float grad_scale,
                       int t) {
  const int64_t begin = shard_begin_, end = shard_begin_ + shard_size_;
  // gradients of [begin, end): the shard buffer at stage 2, the summed full buffer otherwise
  const Tensor grads = stage_ == 2 ? grad_shard_ : grads_padded.rows(begin, shard_size_);
  int64_t off = 0;
  for (const ParameterSpec& s : specs_) {
    const int64_t lo = std::max(off, begin), hi = std::min(off + s.numel(), end);
    if (lo < hi) {
      const float wd = s.weight_decay ? float(cfg_.weight_decay) : 0.f;
      const int64_t n = hi - lo, local = lo - begin;
      ops::adamw_update(ctx, params_padded.rows(lo, n), grads.rows(local, n), m_.rows(local, n), v_.rows(local, n), lr,
                        float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), wd, grad_scale, t);
    }
    off += s.numel();
  }
  if (stage_ >= 1) {
    // in place: this rank's shard already sits at its slot
    world_.all_gather(params_padded.rows(begin, shard_size_).data, params_padded.data, size_t(shard_size_),
                      DType::f32);
  }
}

void ZeroAdamW::gather_state(float* m, float* v) {
  if (stage_ == 0) {
    if (m) std::memcpy(m, m_.data, size_t(n_) * 4);
    if (v) std::memcpy(v, v_.data, size_t(n_) * 4);
    return;
  }
  std::vector<float> whole(static_cast<size_t>(n_padded_));
  for (int k = 0; k < 2; ++k) {
    world_.all_gather((k == 0 ? m_ : v_).data, whole.data(), size_t(shard_size_), DType::f32);
    float* out = k == 0 ? m : v;
    if (world_.rank() == 0 && out) std::memcpy(out, whole.data(), size_t(n_) * 4);
  }
}

void ZeroAdamW::scatter_state(const float* m, const float* v) {
  std::vector<float> whole(size_t(n_padded_), 0.f);
  for (int k = 0; k < 2; ++k) {
    const float* in = k == 0 ? m : v;
    if (world_.rank() == 0) std::memcpy(whole.data(), in, size_t(n_) * 4);
    world_.broadcast(whole.data(), size_t(n_padded_), DType::f32, 0);
    std::memcpy((k == 0 ? m_ : v_).data, whole.data() + shard_begin_, size_t(shard_size_) * 4);
  }
}

}  // namespace ulysses
