// ZeRO stages 0-2 over the world communicator (see core/zero.h).
#include "core/zero.h"

#include <algorithm>
#include <cstring>

#include "core/base/error.h"

namespace ulysses {

int64_t ZeroAdamW::padded_count(int64_t n, int world_size) {
  const int64_t w = std::max(1, world_size);
  return (n + w - 1) / w * w;
}

namespace {
// A host buffer as a tensor (for ops::copy between host and the device)
Tensor host_tensor(const float* p, int64_t n) { return Tensor(const_cast<float*>(p), {n}, DType::f32, Device::cpu); }
}  // namespace

ZeroAdamW::ZeroAdamW(const TrainConfig& cfg, const GPTShape& shape, int stage, Communicator& world, Device device,
                     Communicator* host_world)
    : cfg_(cfg),
      specs_(parameter_specs(shape)),
      stage_(stage),
      world_(world),
      host_world_(host_world ? *host_world : world),
      arena_("optimizer", device) {
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

double ZeroAdamW::reduce_gradients(ops::Context& ctx, Tensor grads_padded, OverlappedGradientAllReduce* overlapped) {
  ULYSSES_ASSERT(grads_padded.numel() == n_padded_, "gradients of {} elements, expected the padded {}",
                 grads_padded.numel(), n_padded_);
  ULYSSES_ASSERT(!overlapped || stage_ < 2, "the overlapped all-reduce is for ZeRO 0 and 1, not {}", stage_);
  if (stage_ < 2) {
    if (overlapped)
      overlapped->finish();  // the layers were summed during backward: the rest, then a join
    else
      world_.all_reduce(grads_padded.data, grads_padded.data, size_t(n_padded_), DType::f32, ReduceOp::sum);
    return ops::sum_squares(ctx, grads_padded);  // the padding is 0
  }
  // [W · S] -> this rank's summed shard [S]
  world_.reduce_scatter(grads_padded.data, grad_shard_.data, size_t(shard_size_), DType::f32, ReduceOp::sum);
  double squares = ops::sum_squares(ctx, grad_shard_);  // on the host (syncs on cuda)
  host_world_.all_reduce(&squares, &squares, 1, DType::f64, ReduceOp::sum);
  return squares;
}

void ZeroAdamW::update(ops::Context& ctx, Tensor params_padded, Tensor grads_padded, float lr, float grad_scale,
                       int t, Tensor compute_padded) {
  const int64_t begin = shard_begin_, end = shard_begin_ + shard_size_;
  // gradients of [begin, end): the shard buffer at stage 2, the summed full buffer otherwise
  const Tensor grads = stage_ == 2 ? grad_shard_ : grads_padded.rows(begin, shard_size_);
  // a separate compute copy (bf16 on cuda) is written in the same pass; on cpu it is the master
  const bool lowp = !compute_padded.empty() && compute_padded.data != params_padded.data;
  ULYSSES_ASSERT(!lowp || compute_padded.numel() == params_padded.numel(), "compute copy {} for master {}",
                 compute_padded.describe(), params_padded.describe());
  int64_t off = 0;
  for (const ParameterSpec& s : specs_) {
    const int64_t lo = std::max(off, begin), hi = std::min(off + s.numel(), end);
    if (lo < hi) {
      const float wd = s.weight_decay ? float(cfg_.weight_decay) : 0.f;
      const int64_t n = hi - lo, local = lo - begin;
      ops::adamw_update(ctx, params_padded.rows(lo, n), grads.rows(local, n), m_.rows(local, n), v_.rows(local, n), lr,
                        float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), wd, grad_scale, t,
                        lowp ? compute_padded.rows(lo, n) : Tensor());
    }
    off += s.numel();
  }
  if (stage_ >= 1) {
    // in place: this rank's shard already sits at its slot
    world_.all_gather(params_padded.rows(begin, shard_size_).data, params_padded.data, size_t(shard_size_),
                      DType::f32);
  }
}

void ZeroAdamW::gather_state(ops::Context& ctx, float* m, float* v) {
  if (stage_ == 0) {  // every rank holds the whole state: the caller's copy comes from its own
    for (int k = 0; k < 2; ++k) {
      float* out = k == 0 ? m : v;
      if (out) ops::copy(ctx, host_tensor(out, n_), (k == 0 ? m_ : v_).rows(0, n_));
    }
    ops::synchronize(ctx);
    return;
  }
  // this rank's shard to the host, then an all-gather of the shards over host memory
  std::vector<float> shard(static_cast<size_t>(shard_size_)), whole(static_cast<size_t>(n_padded_));
  for (int k = 0; k < 2; ++k) {
    ops::copy(ctx, host_tensor(shard.data(), shard_size_), k == 0 ? m_ : v_);
    ops::synchronize(ctx);
    host_world_.all_gather(shard.data(), whole.data(), size_t(shard_size_), DType::f32);
    float* out = k == 0 ? m : v;
    if (world_.rank() == 0 && out) std::memcpy(out, whole.data(), size_t(n_) * 4);
  }
}

void ZeroAdamW::scatter_state(ops::Context& ctx, const float* m, const float* v) {
  // rank 0's whole state to every rank over host memory (zero padding), each keeps its shard
  std::vector<float> whole(size_t(n_padded_), 0.f);
  for (int k = 0; k < 2; ++k) {
    const float* in = k == 0 ? m : v;
    if (world_.rank() == 0) std::memcpy(whole.data(), in, size_t(n_) * 4);
    host_world_.broadcast(whole.data(), size_t(n_padded_), DType::f32, 0);
    ops::copy(ctx, k == 0 ? m_ : v_, host_tensor(whole.data() + shard_begin_, shard_size_));
    ops::synchronize(ctx);  // `whole` is reused for v
  }
}

// ---- ZeRO 0 / 1 with runtime.overlap_comm (see core/zero.h) ------------------------------------

OverlappedGradientAllReduce::OverlappedGradientAllReduce(GPT& model, Communicator& world)
    : model_(model), world_(world) {
  ULYSSES_ASSERT(model.device() == Device::cuda,
                 "runtime.overlap_comm needs runtime.device cuda (a second CUDA stream; config checks it)");
  const GPTRunShape& run = model.run_shape();
  ULYSSES_ASSERT(!run.sharded_layer_grads && !run.sharded_layer_params,
                 "the overlapped all-reduce is for ZeRO 0 and 1: the model must hold its layer gradients");
  const std::vector<ParameterSpec> specs = parameter_specs(model.shape());
  for (int i = 0; i < kFirstLayerTensor + kNumLayerTensors; ++i) {
    if (i == kFirstLayerTensor) layers_begin_ = layers_end_;
    layers_end_ += specs[size_t(i)].numel();
  }
  ULYSSES_ASSERT(model.grads_padded().dtype == DType::f32 && model.grads_padded().numel() >= layers_end_,
                 "the model's gradient buffer {} does not hold the {} elements up to lnfw in fp32",
                 model.grads_padded().describe(), layers_end_);
  comm_ = std::make_unique<CommStream>(model.context().stream(), /*events=*/0,
                                       /*host_wait=*/world.backend() != CommBackend::nccl);
  model_.set_layer_hooks(this);
}

OverlappedGradientAllReduce::~OverlappedGradientAllReduce() { model_.set_layer_hooks(nullptr); }

void OverlappedGradientAllReduce::after_backward(int l) {
  if (!last_micro_batch_) return;  // earlier micro-batches only accumulate
  // layer l's slice of each of the 12 stacked fp32 gradient tensors [L, ...] -> [...], in place
  const LayerTensors g = model_.layer_grads(l);
  // on the comm stream after layer l's backward kernels (enqueued: this hook follows them)
  // the 12 all-reduces as one group: a single NCCL launch
  comm_->run(world_, /*done=*/-1, [&] {
    world_.group_begin();
    try {
      for (const Tensor& t : g.t)
        if (t.numel() > 0) world_.all_reduce(t.data, t.data, size_t(t.numel()), DType::f32, ReduceOp::sum);
    } catch (...) {
      world_.group_end();
      throw;
    }
    world_.group_end();
  });
  ++layers_reduced_;
}

void OverlappedGradientAllReduce::finish() {
  ULYSSES_ASSERT(layers_reduced_ == model_.shape().L,
                 "overlapped all-reduce: {} of {} layers were reduced in the last backward (was "
                 "set_last_micro_batch(true) called before the step's last micro-batch?)",
                 layers_reduced_, model_.shape().L);
  layers_reduced_ = 0;
  last_micro_batch_ = false;
  comm_->join();  // the model stream waits for every layer's all-reduce (the norm reads them)
  // the rest on the model stream, after embedding_backward (and any write between the micro-batches
  // and here): [0, ln1w) = wte, wpe; [lnfw, n_padded) = lnfw, lnfb and the zero padding
  const Tensor grads = model_.grads_padded();
  const int64_t n_padded = grads.numel();
  const Tensor rest[2] = {grads.rows(0, layers_begin_), grads.rows(layers_end_, n_padded - layers_end_)};
  for (const Tensor& t : rest)
    if (t.numel() > 0) world_.all_reduce(t.data, t.data, size_t(t.numel()), DType::f32, ReduceOp::sum);
}

LayerTensors OverlappedGradientAllReduce::layer_params(int l) {
  ULYSSES_ASSERT(false, "layer {}'s parameters asked of the overlapped all-reduce (the model holds them)", l);
  return {};
}

LayerTensors OverlappedGradientAllReduce::layer_grads(int l) {
  ULYSSES_ASSERT(false, "layer {}'s gradients asked of the overlapped all-reduce (the model holds them)", l);
  return {};
}

}  // namespace ulysses
