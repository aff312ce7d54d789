// ZeRO stages 2 and 3 per layer (see core/zero3.h).
#include "core/zero3.h"

#include <algorithm>
#include <cstring>

#include "core/base/error.h"

namespace ulysses {

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// row l of a [L, S] tensor, as [S]
Tensor row(const Tensor& t, int64_t l) { return t.rows(l, 1).reshape({t.shape[1]}); }

// elements [begin, begin + n) of a 1-D view of t
Tensor span(const Tensor& t, int64_t begin, int64_t n) { return t.reshape({t.numel()}).rows(begin, n); }

// each tensor's first element in the flat llm.c-order buffer
std::array<int64_t, kNumParameterTensors> llmc_offsets(const std::vector<ParameterSpec>& specs) {
  std::array<int64_t, kNumParameterTensors> off{};
  for (int i = 1; i < kNumParameterTensors; ++i) off[size_t(i)] = off[size_t(i - 1)] + specs[size_t(i - 1)].numel();
  return off;
}

Tensor host_tensor(const float* p, int64_t n) { return Tensor(const_cast<float*>(p), {n}, DType::f32, Device::cpu); }

}  // namespace

// runtime.overlap_comm: the numbered events of the comm stream (see Streams in core/zero3.h)
namespace {
int gathered_event(int l) { return l % 2; }      // comm -> model: the latest gather into layer buffer l % 2
int reduced_event(int l) { return 2 + l % 2; }   // comm -> model: the latest reduce-scatter of grad buffer l % 2
constexpr int kOverlapEvents = 4;
}  // namespace

LayerShardLayout LayerShardLayout::make(const GPTShape& s, int world_size) {
  LayerShardLayout lay;
  lay.world = std::max(1, world_size);
  const std::vector<ParameterSpec> specs = parameter_specs(s);
  int64_t off = 0;
  for (int k = 0; k < kNumLayerTensors; ++k) {
    lay.offset[size_t(k)] = off;
    lay.numel[size_t(k)] = s.L > 0 ? specs[size_t(kFirstLayerTensor + k)].numel() / s.L : 0;
    off = round_up(off + lay.numel[size_t(k)], kAlign);
  }
  lay.shard = round_up((off + lay.world - 1) / lay.world, kAlign);
  int64_t rest = 0;
  for (size_t j = 0; j < kRestTensors.size(); ++j) {
    lay.rest_offset[j] = rest;
    lay.rest_numel[j] = specs[size_t(kRestTensors[j])].numel();
    rest += lay.rest_numel[j];
  }
  lay.rest_shard = (rest + lay.world - 1) / lay.world;
  return lay;
}

LayerShardedZero::LayerShardedZero(const TrainConfig& cfg, GPT& model, int stage, Communicator& world,
                                   Communicator* host_world, bool overlap_comm)
    : cfg_(cfg),
      model_(model),
      stage_(stage),
      world_(world),
      host_world_(host_world ? *host_world : world),
      ctx_(model.context()),
      specs_(parameter_specs(model.shape())),
      lay_(LayerShardLayout::make(model.shape(), world.size())),
      L_(model.shape().L),
      arena_("ZeRO layer shards", model.context().device) {
  ULYSSES_ASSERT(stage == 2 || stage == 3, "LayerShardedZero runs ZeRO 2 and 3, not {}", stage);
  const GPTRunShape& run = model.run_shape();
  ULYSSES_ASSERT(run.sharded_layer_grads && run.sharded_layer_params == (stage == 3),
                 "ZeRO {}: the model must be built with sharded_layer_grads{}", stage,
                 stage == 3 ? " and sharded_layer_params" : " only");
  ULYSSES_ASSERT(model.grads_padded().numel() == lay_.rest_padded() && model.grads_padded().dtype == DType::f32,
                 "the model's gradient buffer {} is not the fp32 rest block of {} elements (flat_multiple = W?)",
                 model.grads_padded().describe(), lay_.rest_padded());
  ULYSSES_ASSERT(host_world_.size() == world.size() && host_world_.rank() == world.rank(),
                 "host_world ({} of {}) is not world ({} of {})", host_world_.rank(), host_world_.size(), world.rank(),
                 world.size());
  // what forward reads: fp32 on cpu (the model's one buffer), bf16 on cuda (the model keeps no
  // fp32 master there: the shards here are the master weights, see the top of core/zero3.h)
  param_dtype_ = model.compute_params_padded().dtype;
  ULYSSES_ASSERT(param_dtype_ == DType::f32 || param_dtype_ == DType::bf16, "parameters of dtype {}",
                 dtype_name(param_dtype_));
  ULYSSES_ASSERT(model.device() == Device::cpu || model.params_padded().empty(),
                 "ZeRO {} on cuda: the model must be built with GPTRunShape::master_weights = false (its fp32 "
                 "master would go stale: the master weights are the shards here)",
                 stage);
  const bool separate = param_dtype_ != DType::f32;  // a compute copy beside the fp32 master
  const int64_t L = L_, S = lay_.shard, R = lay_.rest_shard, pb = int64_t(dtype_size(param_dtype_));

  auto reserve = [&](int64_t elements, int64_t bytes_each) { return arena_.reserve(size_t(elements * bytes_each)); };
  const size_t o_master = reserve(L * S, 4), o_compute = separate ? reserve(L * S, pb) : 0;
  const size_t o_m = reserve(L * S, 4), o_v = reserve(L * S, 4), o_grad = reserve(L * S, 4);
  const size_t o_rmaster = reserve(R, 4), o_rcompute = separate ? reserve(R, pb) : 0;
  const size_t o_rm = reserve(R, 4), o_rv = reserve(R, 4), o_rgrad = reserve(R, 4);
  const int buffers = stage == 3 ? 2 : 1;
  size_t o_buf[2] = {0, 0};
  for (int b = 0; b < buffers; ++b) o_buf[b] = reserve(lay_.block(), pb);
  const int grad_buffers = overlap_comm ? 2 : 1;  // see Streams in core/zero3.h
  size_t o_lgrad[2] = {0, 0};
  for (int b = 0; b < grad_buffers; ++b) o_lgrad[b] = reserve(lay_.block(), 4);
  arena_.allocate();  // zeroed: the padding of every shard and buffer stays 0

  master_ = arena_.tensor(o_master, {L, S}, DType::f32);
  compute_ = separate ? arena_.tensor(o_compute, {L, S}, param_dtype_) : master_;
  m_ = arena_.tensor(o_m, {L, S}, DType::f32);
  v_ = arena_.tensor(o_v, {L, S}, DType::f32);
  grad_shard_ = arena_.tensor(o_grad, {L, S}, DType::f32);
  rest_master_ = arena_.tensor(o_rmaster, {R}, DType::f32);
  rest_compute_ = separate ? arena_.tensor(o_rcompute, {R}, param_dtype_) : rest_master_;
  rest_m_ = arena_.tensor(o_rm, {R}, DType::f32);
  rest_v_ = arena_.tensor(o_rv, {R}, DType::f32);
  rest_grad_ = arena_.tensor(o_rgrad, {R}, DType::f32);
  for (int b = 0; b < buffers; ++b) layer_buf_[size_t(b)] = arena_.tensor(o_buf[b], {lay_.block()}, param_dtype_);
  for (int b = 0; b < grad_buffers; ++b) layer_grad_[size_t(b)] = arena_.tensor(o_lgrad[b], {lay_.block()}, DType::f32);
  if (overlap_comm) {
    ULYSSES_ASSERT(model.device() == Device::cuda, "runtime.overlap_comm needs runtime.device cuda (config checks it)");
    overlap_ = std::make_unique<CommStream>(ctx_.stream(), kOverlapEvents, /*host_wait=*/world.backend() != CommBackend::nccl);
  }
  model_.set_layer_hooks(this);
}

LayerShardedZero::~LayerShardedZero() { model_.set_layer_hooks(nullptr); }

size_t LayerShardedZero::parameter_bytes() const {
  size_t b = master_.bytes() + rest_master_.bytes();
  for (const Tensor& buf : layer_buf_)
    if (buf.data) b += buf.bytes();  // stage 2 has one (an empty Tensor() counts 1 element)
  if (compute_.data != master_.data) b += compute_.bytes() + rest_compute_.bytes();
  return b;
}
size_t LayerShardedZero::gradient_bytes() const {
  size_t b = grad_shard_.bytes() + rest_grad_.bytes();
  for (const Tensor& buf : layer_grad_)
    if (buf.data) b += buf.bytes();  // two with overlap_comm
  return b;
}
size_t LayerShardedZero::state_bytes() const { return m_.bytes() + v_.bytes() + rest_m_.bytes() + rest_v_.bytes(); }

Tensor LayerShardedZero::own_slice(Tensor block) const {
  return block.rows(int64_t(world_.rank()) * lay_.shard, lay_.shard);
}

LayerTensors LayerShardedZero::views(Tensor block) const {
  LayerTensors out;
  for (int k = 0; k < kNumLayerTensors; ++k) {
    const ParameterSpec& spec = specs_[size_t(kFirstLayerTensor + k)];  // [L, ...]: drop the L
    Tensor t = block;
    t.data = static_cast<char*>(block.data) + size_t(lay_.offset[size_t(k)]) * dtype_size(block.dtype);
    t.ndim = int(spec.shape.size()) - 1;
    for (int i = 0; i < t.ndim; ++i) t.shape[size_t(i)] = spec.shape[size_t(i) + 1];
    out.t[size_t(k)] = t;
  }
  return out;
}

// ---- the layer hooks ----------------------------------------------------------------------------

void LayerShardedZero::gather_layer(int l) {
  Tensor& buf = layer_buf_[size_t(l % 2)];
  int& held = resident_[size_t(l % 2)];
  if (held == l) return;  // still there: the parameters change only in update()
  // [S] of every rank -> layer l's block [W·S] in the compute dtype
  auto gather = [&] { world_.all_gather(row(compute_, l).data, buf.data, size_t(lay_.shard), param_dtype_); };
  if (overlap_) {
    // on the comm stream after every kernel enqueued so far (the last reader of this buffer is
    // the layer before the running one, already enqueued); gathered_event(l) marks it done
    overlap_->run(world_, gathered_event(l), gather);
  } else {
    gather();
  }
  held = l;
}

void LayerShardedZero::before_forward(int l) {
  if (stage_ != 3) return;
  gather_layer(l);
  wait_gathered(l);                     // layer l's kernels follow this hook
  if (l + 1 < L_) gather_layer(l + 1);  // prefetch into the other buffer
}

void LayerShardedZero::before_backward(int l) {
  if (stage_ == 3) {
    gather_layer(l);  // after forward, layers L-1 and L-2 are still held
    wait_gathered(l);
    if (l > 0) gather_layer(l - 1);
  }
  Tensor& grad = grad_buffer(l);
  // overlap_comm: this buffer's last reader is layer l + 2's reduce-scatter (or, at the top, one
  // of the previous micro-batch); the comm stream is in order, so this also covers the
  // reduce-scatter that last wrote gradient shard l, read just below
  if (overlap_) overlap_->model_waits(reduced_event(l));
  // the model's backward accumulates into the layer gradient buffer [W·S]: zero, except this
  // rank's own slot, which starts as its gradient shard l so far (the reduce-scatter then sums it in)
  ops::fill_zero(ctx_, grad);
  ops::copy(ctx_, own_slice(grad), row(grad_shard_, l));
  grad_layer_ = l;
}

void LayerShardedZero::after_backward(int l) {
  ULYSSES_ASSERT(grad_layer_ == l, "after_backward({}) while layer {} runs", l, grad_layer_);
  // [W·S] summed over the world -> this rank's [S], straight into its shard: the shard's old value
  // sat in this rank's slot (before_backward), so the micro-batches accumulate
  const Tensor& grad = grad_buffer(l);
  auto reduce = [&] {
    world_.reduce_scatter(grad.data, row(grad_shard_, l).data, size_t(lay_.shard), DType::f32, ReduceOp::sum);
  };
  if (overlap_) {
    // on the comm stream after layer l's backward kernels (enqueued: this hook follows them);
    // the model stream goes on with layer l - 1 in the other buffer
    overlap_->run(world_, reduced_event(l), reduce);
  } else {
    reduce();
  }
  grad_layer_ = -1;
}

void LayerShardedZero::wait_gathered(int l) {
  if (overlap_) overlap_->model_waits(gathered_event(l));  // a no-op when long done
}

void LayerShardedZero::join_comm() {
  if (overlap_) overlap_->join();
}

LayerTensors LayerShardedZero::layer_params(int l) {
  ULYSSES_ASSERT(stage_ == 3 && resident_[size_t(l % 2)] == l, "layer {}'s parameters are not gathered", l);
  return views(layer_buf_[size_t(l % 2)]);
}

LayerTensors LayerShardedZero::layer_grads(int l) {
  ULYSSES_ASSERT(grad_layer_ == l, "layer {}'s gradients asked for outside its backward", l);
  return views(grad_buffer(l));
}

// ---- the step -----------------------------------------------------------------------------------

void LayerShardedZero::zero_grad() {
  join_comm();  // overlap_comm: no reduce-scatter may still write the shards zeroed here
  ops::fill_zero(ctx_, grad_shard_);
  ops::fill_zero(ctx_, rest_grad_);
}

double LayerShardedZero::reduce_gradients() {
  join_comm();  // overlap_comm: every layer's reduce-scatter is done before the shards are read
  // the rest's gradient is whole in the model (accumulated over the micro-batches): [W·R] -> [R]
  world_.reduce_scatter(model_.grads_padded().data, rest_grad_.data, size_t(lay_.rest_shard), DType::f32,
                        ReduceOp::sum);
  double squares = ops::sum_squares(ctx_, grad_shard_) + ops::sum_squares(ctx_, rest_grad_);  // padding is 0
  host_world_.all_reduce(&squares, &squares, 1, DType::f64, ReduceOp::sum);  // a host value
  return squares;
}

void LayerShardedZero::update(float lr, float grad_scale, int t) {
  const bool separate = compute_.data != master_.data;
  // AdamW on [lo, hi) of tensor `spec`, at `local` in this rank's shard tensors
  auto step = [&](const ParameterSpec& spec, Tensor master, Tensor grad, Tensor m, Tensor v, Tensor compute,
                  int64_t local, int64_t n) {
    const float wd = spec.weight_decay ? float(cfg_.weight_decay) : 0.f;
    ops::adamw_update(ctx_, span(master, local, n), span(grad, local, n), span(m, local, n), span(v, local, n), lr,
                      float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), wd, grad_scale, t,
                      separate ? span(compute, local, n) : Tensor());
  };
  // a shard crosses tensor boundaries: walk the tensors, update each one's intersection with it
  const int64_t S = lay_.shard, begin = int64_t(world_.rank()) * S;
  for (int l = 0; l < L_; ++l)
    for (int k = 0; k < kNumLayerTensors; ++k) {
      const int64_t lo = std::max(lay_.offset[size_t(k)], begin);
      const int64_t hi = std::min(lay_.offset[size_t(k)] + lay_.numel[size_t(k)], begin + S);
      if (lo < hi)
        step(specs_[size_t(kFirstLayerTensor + k)], row(master_, l), row(grad_shard_, l), row(m_, l), row(v_, l),
             separate ? row(compute_, l) : Tensor(), lo - begin, hi - lo);
    }
  const int64_t R = lay_.rest_shard, rbegin = int64_t(world_.rank()) * R;
  for (size_t j = 0; j < LayerShardLayout::kRestTensors.size(); ++j) {
    const int64_t lo = std::max(lay_.rest_offset[j], rbegin);
    const int64_t hi = std::min(lay_.rest_offset[j] + lay_.rest_numel[j], rbegin + R);
    if (lo < hi)
      step(specs_[size_t(LayerShardLayout::kRestTensors[j])], rest_master_, rest_grad_, rest_m_, rest_v_, rest_compute_,
           lo - rbegin, hi - lo);
  }
  publish();
}

void LayerShardedZero::refresh_compute_shards() {
  if (compute_.data == master_.data) return;  // fp32 compute: the master is the compute copy
  ops::cast(ctx_, compute_, master_);
  ops::cast(ctx_, rest_compute_, rest_master_);
}

void LayerShardedZero::publish() {
  // the rest: all-gather the compute shards into the model's rest gradient buffer (free between
  // reduce_gradients and the next zero_grad; [W·R] fp32 holds [W·R] of the compute dtype), then
  // copy each tensor to where the model keeps it
  Tensor staging = model_.grads_padded();
  staging.dtype = param_dtype_;
  world_.all_gather(rest_compute_.data, staging.data, size_t(lay_.rest_shard), param_dtype_);
  for (size_t j = 0; j < LayerShardLayout::kRestTensors.size(); ++j) {
    const Tensor dst = model_.params().t[size_t(LayerShardLayout::kRestTensors[j])];
    if (dst.numel() > 0) ops::copy(ctx_, dst, span(staging, lay_.rest_offset[j], lay_.rest_numel[j]));
  }
  if (stage_ == 3) {
    resident_ = {-1, -1};  // stale: the next forward gathers
    return;
  }
  // stage 2: the model holds every layer whole; gather each and copy its tensors into the stacks
  for (int l = 0; l < L_; ++l) {
    world_.all_gather(row(compute_, l).data, layer_buf_[0].data, size_t(lay_.shard), param_dtype_);
    const LayerTensors src = views(layer_buf_[0]);
    for (int k = 0; k < kNumLayerTensors; ++k)
      ops::copy(ctx_, layer_slice(model_.params().t[size_t(kFirstLayerTensor + k)], l), src.t[size_t(k)]);
  }
}

// ---- init and checkpoints -----------------------------------------------------------------------

void LayerShardedZero::init_weights(uint64_t seed) {
  const int64_t S = lay_.shard, begin = int64_t(world_.rank()) * S;
  const int64_t R = lay_.rest_shard, rbegin = int64_t(world_.rank()) * R;
  // this rank's master shards built in host memory (zero padding), then copied over once
  std::vector<float> master(size_t(L_ * S), 0.f), rest_master(size_t(R), 0.f);
  // values [n] for places [pos, pos + n) of a layer block (or the rest): keep those in this
  // rank's shard [shard_begin, shard_begin + shard_size), whose first element is dst
  auto keep = [](float* dst, int64_t shard_begin, int64_t shard_size, int64_t pos, const float* values, int64_t n) {
    const int64_t lo = std::max(pos, shard_begin), hi = std::min(pos + n, shard_begin + shard_size);
    if (lo < hi) std::memcpy(dst + (lo - shard_begin), values + (lo - pos), size_t(hi - lo) * 4);
  };
  auto sink = [&](int i, int64_t first, const float* values, int64_t n) {
    if (i < kFirstLayerTensor || i >= kFirstLayerTensor + kNumLayerTensors) {  // the rest
      const auto& rt = LayerShardLayout::kRestTensors;
      const size_t j = size_t(std::find(rt.begin(), rt.end(), i) - rt.begin());
      keep(rest_master.data(), rbegin, R, lay_.rest_offset[j] + first, values, n);
      return;
    }
    // a stacked [L, ...] tensor: split the chunk at layer boundaries
    const int k = i - kFirstLayerTensor;
    const int64_t nk = lay_.numel[size_t(k)];
    for (int64_t e = first; e < first + n;) {
      const int64_t l = e / nk, o = e % nk, len = std::min(nk - o, first + n - e);
      keep(master.data() + l * S, begin, S, lay_.offset[size_t(k)] + o, values + (e - first), len);
      e += len;
    }
  };
  parameter_init_values(model_.shape(), model_.init_std(), seed, sink);
  ops::copy(ctx_, master_, host_tensor(master.data(), L_ * S).reshape({L_, S}));
  ops::copy(ctx_, rest_master_, host_tensor(rest_master.data(), R));
  ops::synchronize(ctx_);  // the host vectors are freed on return
  refresh_compute_shards();
  publish();
}

// Both checkpoint paths move one [W·S] layer block (or the [W·R] rest) of one array at a time
// through host memory over host_world: a few hundred MB at most for the largest shapes, and the
// device needs no staging buffer.
void LayerShardedZero::gather_full(float* params, float* m, float* v, bool with_state) {
  join_comm();  // (between steps the comm stream is idle already; cheap and sure)
  const bool root = world_.rank() == 0;
  ULYSSES_ASSERT(!root || (params && (!with_state || (m && v))), "gather_full: rank 0 needs the output buffers");
  const auto flat = llmc_offsets(specs_);
  const int64_t S = lay_.shard, R = lay_.rest_shard;
  const Tensor layer_shards[3] = {master_, m_, v_}, rest_shards[3] = {rest_master_, rest_m_, rest_v_};
  float* outs[3] = {params, m, v};
  std::vector<float> shard(size_t(std::max(S, R))), block(size_t(std::max(lay_.block(), lay_.rest_padded())));
  for (int a = 0; a < (with_state ? 3 : 1); ++a) {
    for (int l = 0; l < L_; ++l) {
      // this rank's [S] of layer l -> host; all-gather: layer l's block [W·S] on every rank
      ops::copy(ctx_, host_tensor(shard.data(), S), row(layer_shards[a], l));
      ops::synchronize(ctx_);
      host_world_.all_gather(shard.data(), block.data(), size_t(S), DType::f32);
      if (!root) continue;
      for (int k = 0; k < kNumLayerTensors; ++k)
        std::memcpy(outs[a] + flat[size_t(kFirstLayerTensor + k)] + l * lay_.numel[size_t(k)],
                    block.data() + lay_.offset[size_t(k)], size_t(lay_.numel[size_t(k)]) * 4);
    }
    // the rest: [R] per rank -> [W·R]
    ops::copy(ctx_, host_tensor(shard.data(), R), rest_shards[a]);
    ops::synchronize(ctx_);
    host_world_.all_gather(shard.data(), block.data(), size_t(R), DType::f32);
    if (!root) continue;
    for (size_t j = 0; j < LayerShardLayout::kRestTensors.size(); ++j)
      std::memcpy(outs[a] + flat[size_t(LayerShardLayout::kRestTensors[j])], block.data() + lay_.rest_offset[j],
                  size_t(lay_.rest_numel[j]) * 4);
  }
}

void LayerShardedZero::scatter_full(const float* params, const float* m, const float* v, bool with_state) {
  join_comm();  // the shards are overwritten below: no gather may still be reading them
  const bool root = world_.rank() == 0;
  ULYSSES_ASSERT(!root || (params && (!with_state || (m && v))), "scatter_full: rank 0 needs the input buffers");
  const auto flat = llmc_offsets(specs_);
  const int64_t S = lay_.shard, R = lay_.rest_shard, r = world_.rank();
  const Tensor layer_shards[3] = {master_, m_, v_}, rest_shards[3] = {rest_master_, rest_m_, rest_v_};
  const float* ins[3] = {params, m, v};
  if (!with_state)
    for (int a = 1; a < 3; ++a) ops::fill_zero(ctx_, layer_shards[a]), ops::fill_zero(ctx_, rest_shards[a]);
  std::vector<float> block(size_t(std::max(lay_.block(), lay_.rest_padded())));
  for (int a = 0; a < (with_state ? 3 : 1); ++a) {
    for (int l = 0; l < L_; ++l) {
      // rank 0 lays out layer l's block [W·S] (zero padding), broadcasts it; everyone keeps its [S]
      if (root) {
        std::fill(block.begin(), block.end(), 0.f);
        for (int k = 0; k < kNumLayerTensors; ++k)
          std::memcpy(block.data() + lay_.offset[size_t(k)],
                      ins[a] + flat[size_t(kFirstLayerTensor + k)] + l * lay_.numel[size_t(k)],
                      size_t(lay_.numel[size_t(k)]) * 4);
      }
      host_world_.broadcast(block.data(), size_t(lay_.block()), DType::f32, 0);
      ops::copy(ctx_, row(layer_shards[a], l), host_tensor(block.data() + r * S, S));
      ops::synchronize(ctx_);  // `block` is refilled next
    }
    if (root) {
      std::fill(block.begin(), block.end(), 0.f);
      for (size_t j = 0; j < LayerShardLayout::kRestTensors.size(); ++j)
        std::memcpy(block.data() + lay_.rest_offset[j], ins[a] + flat[size_t(LayerShardLayout::kRestTensors[j])],
                    size_t(lay_.rest_numel[j]) * 4);
    }
    host_world_.broadcast(block.data(), size_t(lay_.rest_padded()), DType::f32, 0);
    ops::copy(ctx_, rest_shards[a], host_tensor(block.data() + r * R, R));
    ops::synchronize(ctx_);
  }
  refresh_compute_shards();
  publish();
}

}  // namespace ulysses
