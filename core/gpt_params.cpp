// The model's parameters (core/gpt.h): the shapes (GPTShape, check_cuda_shape), the 16 tensors'
// specs in llm.c order and their views (carve_parameters, layer_slice, GPT::layer_params /
// layer_grads), the FLOP count per token, the constructor's parameter and gradient arenas
// (GPT::allocate_parameters), and the GPT-2 init (parameter_init_values, GPT::init_weights).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/base/error.h"
#include "core/gpt_internal.h"

namespace ulysses {

// ---- shapes and parameter layout --------------------------------------------------------------

GPTShape GPTShape::from(const ModelConfig& m) {
  GPTShape s;
  s.L = m.n_layer;
  s.C = m.n_embd;
  s.Hq = m.n_head;
  s.Hkv = m.kv_heads();
  s.d = m.head_dim();
  s.V = m.vocab_size;
  s.Vp = m.padded_vocab_size();
  s.maxT = m.max_seq_len;
  s.rope = m.rope();
  s.rope_theta = float(m.rope_theta);
  return s;
}

int64_t ParameterSpec::numel() const {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

std::vector<ParameterSpec> parameter_specs(const GPTShape& s) {
  const int64_t L = s.L, C = s.C, QKV = int64_t(s.qkv_heads()) * s.d;
  return {
      {"wte", {s.Vp, C}, true},         {"wpe", {s.rope ? 0 : s.maxT, C}, true},
      {"ln1w", {L, C}, false},          {"ln1b", {L, C}, false},
      {"qkvw", {L, QKV, C}, true},      {"qkvb", {L, QKV}, false},
      {"attprojw", {L, C, C}, true},    {"attprojb", {L, C}, false},
      {"ln2w", {L, C}, false},          {"ln2b", {L, C}, false},
      {"fcw", {L, 4 * C, C}, true},     {"fcb", {L, 4 * C}, false},
      {"fcprojw", {L, C, 4 * C}, true}, {"fcprojb", {L, C}, false},
      {"lnfw", {C}, false},             {"lnfb", {C}, false},
  };
}

int64_t num_parameters(const GPTShape& s) {
  int64_t n = 0;
  for (const auto& p : parameter_specs(s)) n += p.numel();
  return n;
}

int64_t flops_per_token(const GPTShape& s, int N, bool causal_halved) {
  // 6 FLOPs per parameter per token (forward 2, backward 4) for every matmul weight, counting the
  // tied LM head (wte) but not the position table (a lookup); attention's QK^T and PV add
  // 12 * L * C * N per token over the full square, half of it under the causal mask.
  const int64_t matmul_params = num_parameters(s) - (s.rope ? 0 : int64_t(s.maxT) * s.C);
  const int64_t attention = 12ll * s.L * s.C * N;
  return 6 * matmul_params + (causal_halved ? attention / 2 : attention);
}

void GPT::check_cuda_shape(const ModelConfig& m, bool cudnn_attention) {
  const int qkv_width = (m.n_head + 2 * m.kv_heads()) * m.head_dim();
  if (m.n_embd % 8 != 0)
    throw_user_error("model.n_embd = {}: runtime.device cuda needs a multiple of 8 (16-byte bf16 rows for cuBLASLt)",
                     m.n_embd);
  if (qkv_width % 8 != 0)
    throw_user_error("model.n_head / model.n_kv_head: the qkv width (n_head + 2 n_kv_head) * head_dim = ({} + 2 * {}) "
                     "* {} = {} must be a multiple of 8 on runtime.device cuda",
                     m.n_head, m.kv_heads(), m.head_dim(), qkv_width);
  if (!cudnn_attention && m.head_dim() != 64 && m.head_dim() != 128)
    throw_user_error("model.n_embd / model.n_head: head_dim = {} / {} = {}, but the flash attention kernels of "
                     "runtime.device cuda take head_dim 64 or 128 (runtime.attention: cudnn takes others)",
                     m.n_embd, m.n_head, m.head_dim());
  // cuDNN's SDPA (kernels/cuda/attention_cudnn.h) takes head dims that are multiples of 8 up to
  // 128; the flash kernels' 64 and 128 are among them, so the constructor's check covers both
  if (m.head_dim() % 8 != 0 || m.head_dim() > 128)
    throw_user_error("model.n_embd / model.n_head: head_dim = {} / {} = {}, but runtime.device cuda takes a "
                     "head_dim that is a multiple of 8 and at most 128 (runtime.attention: cudnn; flash: 64 or 128)",
                     m.n_embd, m.n_head, m.head_dim());
}

namespace {

// The 16 parameter tensors as views of a flat buffer of any dtype (llm.c order). Without
// with_layers the flat buffer holds only the non-layer tensors (wte, wpe, lnfw, lnfb) and the
// 12 layer tensors get their shapes but no data (sharded layers, core/zero3.h).
ParameterTensors carve_parameters(const Tensor& flat, const std::vector<ParameterSpec>& specs,
                                  bool with_layers = true) {
  ParameterTensors out;
  int64_t off = 0;
  for (int i = 0; i < kNumParameterTensors; ++i) {
    const bool stored = with_layers || i < kFirstLayerTensor || i >= kFirstLayerTensor + kNumLayerTensors;
    Tensor t = flat;
    t.data = stored ? static_cast<char*>(flat.data) + size_t(off) * dtype_size(flat.dtype) : nullptr;
    t.ndim = int(specs[size_t(i)].shape.size());
    for (int k = 0; k < t.ndim; ++k) t.shape[k] = specs[size_t(i)].shape[size_t(k)];
    out.t[size_t(i)] = t;
    if (stored) off += specs[size_t(i)].numel();
  }
  return out;
}

}  // namespace

Tensor layer_slice(const Tensor& stacked, int l) {
  Tensor t = stacked.rows(l, 1);
  // drop the leading 1
  Tensor out = t;
  out.ndim = t.ndim - 1;
  for (int i = 0; i < out.ndim; ++i) out.shape[i] = t.shape[i + 1];
  return out;
}

LayerTensors GPT::layer_params(int l) {
  if (run_.sharded_layer_params) {
    ULYSSES_ASSERT(hooks_, "sharded layer parameters without LayerHooks");
    return hooks_->layer_params(l);
  }
  LayerTensors out;
  for (int k = 0; k < kNumLayerTensors; ++k) out.t[k] = layer_slice(params_.t[kFirstLayerTensor + k], l);
  return out;
}

LayerTensors GPT::layer_grads(int l) {
  if (run_.sharded_layer_grads) {
    ULYSSES_ASSERT(hooks_, "sharded layer gradients without LayerHooks");
    return hooks_->layer_grads(l);
  }
  LayerTensors out;
  for (int k = 0; k < kNumLayerTensors; ++k) out.t[k] = layer_slice(grads_.t[kFirstLayerTensor + k], l);
  return out;
}

// ---- parameter and gradient arenas ------------------------------------------------------------

// One buffer each, llm.c order. With sharded layers (ZeRO 2 / 3, core/zero3.h) a buffer holds
// only the non-layer tensors wte, wpe, lnfw, lnfb, and the layer tensors keep their shapes but
// no data. Every arena is allocated unzeroed and zeroed on ctx_'s stream (zero_arena), so later
// ops on the stream see the zeros.
void GPT::allocate_parameters(GPT* shared_params) {
  const GPTShape& s = shape_;
  const GPTRunShape& run = run_;
  const Device device = device_;
  const auto specs = parameter_specs(s);
  const int64_t n_params = num_parameters(s);
  ULYSSES_ASSERT(!run.sharded_layer_params || run.sharded_layer_grads, "sharded layer parameters need sharded gradients");
  int64_t n_layer_tensors = 0;
  for (int k = 0; k < kNumLayerTensors; ++k) n_layer_tensors += specs[size_t(kFirstLayerTensor + k)].numel();
  // parameters this model stores (with sharded layer parameters: the rest only)
  const int64_t n_p = run.sharded_layer_params ? n_params - n_layer_tensors : n_params;
  if (shared_params) {
    ULYSSES_ASSERT(shared_params->shape_.L == s.L && shared_params->shape_.C == s.C &&
                       shared_params->device_ == device,
                   "shared parameters of another shape or device");
    ULYSSES_ASSERT(!shared_params->run_.sharded_layer_params && !run.sharded_layer_params,
                   "a model with sharded layer parameters cannot share them");
    params_flat_ = shared_params->params_flat_;
    params_padded_ = shared_params->params_padded_;
    compute_padded_ = shared_params->compute_padded_;
  } else {
    // zero padding to a multiple of flat_multiple (the arenas are zeroed on allocation and
    // nothing writes the padding, so it stays 0 through training)
    const int64_t m = std::max(1, run.flat_multiple);
    const int64_t n_g = run.sharded_layer_grads ? n_params - n_layer_tensors : n_params;
    const int64_t p_padded = (n_p + m - 1) / m * m, g_padded = (n_g + m - 1) / m * m;
    if (device == Device::cuda && !run.master_weights) {
      // no fp32 master here (GPTRunShape::master_weights): empty views, the compute copy below
      params_padded_ = Tensor(nullptr, {0}, DType::f32, device);
      params_flat_ = params_padded_;
    } else {
      const size_t p_off = param_arena_.reserve(size_t(p_padded) * 4);
      param_arena_.allocate(/*zero=*/false);
      zero_arena(ctx_, param_arena_);
      params_padded_ = param_arena_.tensor(p_off, {p_padded}, DType::f32);  // fp32 [p_padded]
      params_flat_ = params_padded_.rows(0, n_p);
    }
    if (device == Device::cuda) {
      const size_t c_off = compute_arena_.reserve(size_t(p_padded) * 2);
      compute_arena_.allocate(/*zero=*/false);
      zero_arena(ctx_, compute_arena_);
      compute_padded_ = compute_arena_.tensor(c_off, {p_padded}, DType::bf16);  // bf16 [p_padded]
    } else {
      compute_padded_ = params_padded_;
    }
    const size_t g_off = grad_arena_.reserve(size_t(g_padded) * 4);
    grad_arena_.allocate(/*zero=*/false);
    zero_arena(ctx_, grad_arena_);
    grads_padded_ = grad_arena_.tensor(g_off, {g_padded}, DType::f32);       // fp32 [g_padded]
    grads_flat_ = grads_padded_.rows(0, n_g);
    grads_ = carve_parameters(grads_flat_, specs, !run.sharded_layer_grads);
  }
  // forward/backward read the compute copy: bf16 on cuda (every tensor starts at a multiple of
  // 8 elements, 16 bytes, since C and the qkv width are multiples of 8), params_flat_ on cpu
  params_ = carve_parameters(compute_padded_.rows(0, n_p), specs, !run.sharded_layer_params);
}

// ---- init -------------------------------------------------------------------------------------

void parameter_init_values(const GPTShape& s, double init_std, uint64_t seed,
                           const std::function<void(int tensor, int64_t begin, const float* values, int64_t n)>& sink) {
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return (double(rng() >> 11) + 0.5) * (1.0 / 9007199254740992.0); };
  // chunks of an even length: a Box-Muller pair never straddles two chunks, so the stream is the
  // same as one pass over the whole tensor
  constexpr int64_t kChunk = 1 << 16;
  std::vector<float> buf(static_cast<size_t>(kChunk));
  auto normal = [&](int tensor, int64_t n, double std) {
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      float* p = buf.data();
      for (int64_t i = 0; i < len; i += 2) {
        const double u1 = uniform(), u2 = uniform();
        const double r = std::sqrt(-2.0 * std::log(u1));
        p[i] = float(std * r * std::cos(2 * M_PI * u2));
        if (i + 1 < len) p[i + 1] = float(std * r * std::sin(2 * M_PI * u2));
      }
      sink(tensor, c, p, len);
    }
  };
  auto fill = [&](int tensor, int64_t n, float v) {
    std::fill(buf.begin(), buf.end(), v);
    for (int64_t c = 0; c < n; c += kChunk) sink(tensor, c, buf.data(), std::min(kChunk, n - c));
  };
  const double residual_std = init_std / std::sqrt(2.0 * s.L);
  const std::vector<ParameterSpec> specs = parameter_specs(s);
  for (int i = 0; i < kNumParameterTensors; ++i) {
    const ParameterSpec& p = specs[size_t(i)];
    const int64_t n = p.numel();
    if (n == 0) continue;  // wpe with rotary positions
    if (p.name == "attprojw" || p.name == "fcprojw")
      normal(i, n, residual_std);
    else if (p.weight_decay)  // wte, wpe, qkvw, fcw
      normal(i, n, init_std);
    else
      fill(i, n, p.name == "ln1w" || p.name == "ln2w" || p.name == "lnfw" ? 1.f : 0.f);
  }
}

void GPT::init_weights(uint64_t seed) {
  // The values come from parameter_init_values, on the host: in place on cpu; on cuda into a
  // host copy of the master weights, copied over below, so both devices get the same fp32
  // values. Only the tensors this model stores (with sharded layers: wte, wpe, lnfw, lnfb;
  // core/zero3.h initialises the layer shards from the same stream).
  ULYSSES_ASSERT(device_ != Device::cuda || run_.master_weights,
                 "init_weights on a cuda model without master weights (LayerShardedZero::init_weights initialises)");
  const int64_t n = params_flat_.numel();
  std::vector<float> host_master(device_ == Device::cuda ? size_t(n) : 0);
  const Tensor master = device_ == Device::cuda ? Tensor(host_master.data(), {n}, DType::f32, Device::cpu)
                                                : params_flat_;
  const ParameterTensors p = carve_parameters(master, parameter_specs(shape_), !run_.sharded_layer_params);
  parameter_init_values(shape_, init_std_, seed, [&](int i, int64_t begin, const float* values, int64_t count) {
    const Tensor& t = p.t[size_t(i)];
    if (t.data) std::memcpy(t.f32() + begin, values, size_t(count) * 4);
  });
  if (device_ == Device::cuda) {
    ops::copy(ctx_, params_flat_, master);
    ops::synchronize(ctx_);  // host_master is freed on return
  }
  refresh_compute_params();
}

void GPT::refresh_compute_params() {
  // fp32 -> bf16, padding 0 -> 0; without master weights the optimizer writes the compute copy
  if (device_ == Device::cuda && !params_padded_.empty()) ops::cast(ctx_, compute_padded_, params_padded_);
}

void GPT::zero_grad() { ops::fill_zero(ctx_, grads_flat_); }

}  // namespace ulysses
