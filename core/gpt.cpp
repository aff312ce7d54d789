// GPT forward and backward for one rank of a DP × SP layout (see core/gpt.h).
#include "core/gpt.h"

#include <cmath>
#include <cstring>
#include <random>

#include "core/error.h"

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

Tensor layer_slice(const Tensor& stacked, int l) {
  Tensor t = stacked.rows(l, 1);
  // drop the leading 1
  Tensor out = t;
  out.ndim = t.ndim - 1;
  for (int i = 0; i < out.ndim; ++i) out.shape[i] = t.shape[i + 1];
  return out;
}

// ---- activations --------------------------------------------------------------------------------

struct GPT::Layer {
  Tensor ln1, ln1_mean, ln1_rstd;   // [B*T, C], [B*T], [B*T]
  Tensor qkv_full;                  // [B, N, hq+2hkv, d]   (P = 1: the local qkv)
  Tensor att_full, lse;             // [B, N, hq, d], [B, hq, N]
  Tensor att;                       // [B*T, C]             (P = 1: att_full's memory)
  Tensor residual2;                 // [B*T, C]
  Tensor ln2, ln2_mean, ln2_rstd;   // [B*T, C], [B*T], [B*T]
  Tensor fch, fch_gelu;             // [B*T, 4C]
  Tensor residual3;                 // [B*T, C]  the block's output
};

GPT::GPT(const ModelConfig& cfg, GPTRunShape run, Device device, Communicator* seq, GPT* shared_params)
    : shape_(GPTShape::from(cfg)),
      init_std_(cfg.init_std),
      run_(run),
      device_(device),
      seq_(run.P > 1 ? seq : nullptr),
      param_arena_("parameters", device),
      grad_arena_("gradients", device),
      act_arena_("activations", device) {
  ctx_.device = device;
  const GPTShape& s = shape_;
  const int B = run.B, N = run.N, P = run.P, T = run.T(), C = s.C, d = s.d;
  ULYSSES_ASSERT(N % P == 0, "N = {} not divisible by P = {}", N, P);
  if (N > s.maxT && !s.rope)
    throw_user_error("train.seq_len = {} exceeds model.max_seq_len = {} (the learned position table)", N, s.maxT);
  const int64_t BT = int64_t(B) * T;

  // -- parameters and gradients: one buffer each, llm.c order
  const auto specs = parameter_specs(s);
  const int64_t n_params = num_parameters(s);
  auto carve = [&](Tensor flat, ParameterTensors& out) {
    int64_t off = 0;
    for (int i = 0; i < kNumParameterTensors; ++i) {
      Tensor t = flat;
      t.data = static_cast<float*>(flat.data) + off;
      t.ndim = int(specs[i].shape.size());
      for (int k = 0; k < t.ndim; ++k) t.shape[k] = specs[i].shape[k];
      out.t[i] = t;
      off += specs[i].numel();
    }
  };
  if (shared_params) {
    ULYSSES_ASSERT(shared_params->shape_.L == s.L && shared_params->shape_.C == s.C, "shared parameters of another shape");
    params_flat_ = shared_params->params_flat_;
  } else {
    const size_t p_off = param_arena_.reserve(size_t(n_params) * 4);
    param_arena_.allocate();
    params_flat_ = param_arena_.tensor(p_off, {n_params}, DType::f32);
    const size_t g_off = grad_arena_.reserve(size_t(n_params) * 4);
    grad_arena_.allocate();
    grads_flat_ = grad_arena_.tensor(g_off, {n_params}, DType::f32);
    carve(grads_flat_, grads_);
  }
  carve(params_flat_, params_);

  // -- the Ulysses all-to-alls and this rank's heads
  hq_ = s.Hq;
  hkv_ = s.Hkv;
  if (P > 1) {
    ULYSSES_ASSERT(seq_ && seq_->size() == P, "P = {} needs a sequence communicator of that size", P);
    ulysses_ = std::make_unique<UlyssesAllToAll>(seq_, plan_ulysses_heads(s.Hq, s.Hkv, P), B, T, d);
    hq_ = ulysses_->plan().local_q_heads(seq_->rank());
    hkv_ = ulysses_->plan().local_kv_heads(seq_->rank());
  }
  const int Htot = s.qkv_heads(), hloc = hq_ + 2 * hkv_;

  // -- activations: reserve everything, allocate once, then take the views
  std::vector<std::pair<Tensor*, std::pair<std::vector<int64_t>, DType>>> wanted;
  auto want = [&](Tensor& t, std::initializer_list<int64_t> dims, DType dt = DType::f32) {
    wanted.push_back({&t, {std::vector<int64_t>(dims), dt}});
  };
  want(tokens_, {BT}, DType::i32);
  want(targets_, {BT}, DType::i32);
  want(positions_, {BT}, DType::i32);
  want(encoded_, {BT, C});
  layers_.resize(s.L);
  for (Layer& a : layers_) {
    want(a.ln1, {BT, C});
    want(a.ln1_mean, {BT});
    want(a.ln1_rstd, {BT});
    want(a.qkv_full, {B, N, hloc, d});
    want(a.att_full, {B, N, hq_, d});
    want(a.lse, {B, hq_, N});
    if (P > 1) want(a.att, {BT, C});
    want(a.residual2, {BT, C});
    want(a.ln2, {BT, C});
    want(a.ln2_mean, {BT});
    want(a.ln2_rstd, {BT});
    want(a.fch, {BT, 4 * C});
    want(a.fch_gelu, {BT, 4 * C});
    want(a.residual3, {BT, C});
  }
  want(lnf_, {BT, C});
  want(lnf_mean_, {BT});
  want(lnf_rstd_, {BT});
  want(losses_, {BT});
  const int64_t chunk = std::min<int64_t>(BT, run.tile_tokens > 0 ? run.tile_tokens : 256);
  want(logits_, {chunk, s.Vp});
  if (P > 1) {
    want(qkv_local_, {B, T, Htot, d});
    want(dqkv_local_, {B, T, Htot, d});
    const int64_t scratch = int64_t(ulysses_->scratch_elements());
    want(sp_send_, {scratch});
    want(sp_recv_, {scratch});
  }
  want(dqkv_full_, {B, N, hloc, d});
  want(datt_full_, {B, N, hq_, d});
  want(dres_, {BT, C});
  want(dlnf_, {BT, C});
  want(dln_, {BT, C});
  if (P > 1) want(datt_, {BT, C});
  want(dfch_gelu_, {BT, 4 * C});
  want(dfch_, {BT, 4 * C});

  std::vector<size_t> offsets;
  for (auto& w : wanted) {
    int64_t n = 1;
    for (int64_t v : w.second.first) n *= v;
    offsets.push_back(act_arena_.reserve(size_t(n) * dtype_size(w.second.second)));
  }
  act_arena_.allocate();
  for (size_t i = 0; i < wanted.size(); ++i) {
    const auto& dims = wanted[i].second.first;
    Tensor t = act_arena_.tensor(offsets[i], {1}, wanted[i].second.second);
    t.ndim = int(dims.size());
    for (int k = 0; k < t.ndim; ++k) t.shape[k] = dims[k];
    ULYSSES_ASSERT(offsets[i] + t.bytes() <= act_arena_.bytes(), "activation overrun");
    *wanted[i].first = t;
  }
  if (P == 1) {
    // attention works in place on the local tensors: no all-to-all, no copies
    for (Layer& a : layers_) a.att = a.att_full.reshape({BT, C});
    datt_ = datt_full_.reshape({BT, C});
  } else {
    ulysses_->set_scratch(sp_send_, sp_recv_);
  }
}

GPT::~GPT() = default;

size_t GPT::activation_bytes() const { return act_arena_.bytes(); }

// ---- init -------------------------------------------------------------------------------------

void GPT::init_weights(uint64_t seed) {
  ULYSSES_ASSERT(device_ == Device::cpu, "init_weights runs on host parameters");
  // Box-Muller on mt19937_64 by hand: std::normal_distribution is implementation-defined.
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return (double(rng() >> 11) + 0.5) * (1.0 / 9007199254740992.0); };
  auto normal = [&](float* p, int64_t n, double std) {
    for (int64_t i = 0; i < n; i += 2) {
      const double u1 = uniform(), u2 = uniform();
      const double r = std::sqrt(-2.0 * std::log(u1));
      p[i] = float(std * r * std::cos(2 * M_PI * u2));
      if (i + 1 < n) p[i + 1] = float(std * r * std::sin(2 * M_PI * u2));
    }
  };
  auto fill = [](Tensor t, float v) {
    float* p = t.f32();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = v;
  };
  const double std = init_std_;
  const double residual_std = std / std::sqrt(2.0 * shape_.L);
  auto& p = params_;
  normal(p.wte().f32(), p.wte().numel(), std);
  if (!p.wpe().empty()) normal(p.wpe().f32(), p.wpe().numel(), std);
  fill(p.ln1w(), 1.f);
  fill(p.ln1b(), 0.f);
  normal(p.qkvw().f32(), p.qkvw().numel(), std);
  fill(p.qkvb(), 0.f);
  normal(p.attprojw().f32(), p.attprojw().numel(), residual_std);
  fill(p.attprojb(), 0.f);
  fill(p.ln2w(), 1.f);
  fill(p.ln2b(), 0.f);
  normal(p.fcw().f32(), p.fcw().numel(), std);
  fill(p.fcb(), 0.f);
  normal(p.fcprojw().f32(), p.fcprojw().numel(), residual_std);
  fill(p.fcprojb(), 0.f);
  fill(p.lnfw(), 1.f);
  fill(p.lnfb(), 0.f);
}

void GPT::zero_grad() { ops::fill_zero(ctx_, grads_flat_); }

// ---- forward ----------------------------------------------------------------------------------

void GPT::attention_forward(Layer& a, int l) {
  const GPTShape& s = shape_;
  const int B = run_.B, T = run_.T(), d = s.d;
  auto& p = params_;
  // qkv = ln1 · Wqkv + b        [B*T, C] -> [B, T, Hq + 2Hkv, d]
  Tensor qkv = run_.P > 1 ? qkv_local_ : a.qkv_full;
  ops::matmul_forward(ctx_, qkv.reshape({int64_t(B) * T, int64_t(s.qkv_heads()) * d}), a.ln1,
                      layer_slice(p.qkvw(), l), layer_slice(p.qkvb(), l));
  if (s.rope) {  // rotate q and k by their global positions, before they leave the rank
    ops::rope_forward(ctx_, qkv, 0, s.Hq + s.Hkv, positions_, s.rope_theta);
  }
  if (run_.P > 1) {
    // all-to-all #1: [B, N/P, Hq + 2Hkv, d] -> [B, N, hq + 2hkv, d]
    ulysses_->all_to_all_qkv_heads_to_seq(ctx_, a.qkv_full, qkv_local_);
  }
  // causal attention over all N tokens for this rank's heads: [B, N, hq, d], lse [B, hq, N]
  ops::attention_forward(ctx_, a.att_full, a.lse, a.qkv_full, hq_, hkv_);
  if (run_.P > 1) {
    // all-to-all #2: [B, N, hq, d] -> [B, N/P, Hq, d] = [B*T, C]
    ulysses_->all_to_all_out_seq_to_heads(ctx_, a.att.reshape({B, T, s.Hq, d}), a.att_full);
  }
}

void GPT::forward(const int32_t* tokens, const int32_t* positions) {
  const GPTShape& s = shape_;
  const int64_t BT = int64_t(run_.B) * run_.T();
  std::memcpy(tokens_.data, tokens, size_t(BT) * 4);
  std::memcpy(positions_.data, positions, size_t(BT) * 4);
  for (int64_t i = 0; i < BT; ++i) {
    if (tokens[i] < 0 || tokens[i] >= s.V)
      throw_user_error("token id {} at position {} is outside the vocabulary [0, {})", tokens[i], i, s.V);
    if (positions[i] < 0 || (!s.rope && positions[i] >= s.maxT))
      throw_user_error("position {} is outside [0, model.max_seq_len = {})", positions[i], s.maxT);
  }
  auto& p = params_;
  // x = wte[tokens] + wpe[positions]                          [B*T, C]
  ops::embedding_forward(ctx_, encoded_, tokens_, positions_, p.wte(), s.rope ? Tensor() : p.wpe());
  Tensor x = encoded_;
  for (int l = 0; l < s.L; ++l) {
    Layer& a = layers_[l];
    // attention block: x + Wo · attention(LN1(x))
    ops::layernorm_forward(ctx_, a.ln1, a.ln1_mean, a.ln1_rstd, x, layer_slice(p.ln1w(), l), layer_slice(p.ln1b(), l));
    attention_forward(a, l);
    ops::matmul_forward(ctx_, a.residual2, a.att, layer_slice(p.attprojw(), l), layer_slice(p.attprojb(), l));
    ops::residual_forward(ctx_, a.residual2, a.residual2, x);
    // MLP block: x + W2 · gelu(W1 · LN2(x))
    ops::layernorm_forward(ctx_, a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, layer_slice(p.ln2w(), l),
                           layer_slice(p.ln2b(), l));
    ops::matmul_forward(ctx_, a.fch, a.ln2, layer_slice(p.fcw(), l), layer_slice(p.fcb(), l));
    ops::gelu_forward(ctx_, a.fch_gelu, a.fch);
    ops::matmul_forward(ctx_, a.residual3, a.fch_gelu, layer_slice(p.fcprojw(), l), layer_slice(p.fcprojb(), l));
    ops::residual_forward(ctx_, a.residual3, a.residual3, a.residual2);
    x = a.residual3;
  }
  ops::layernorm_forward(ctx_, lnf_, lnf_mean_, lnf_rstd_, x, p.lnfw(), p.lnfb());
}

// The LM head (tied to wte) and the loss, in chunks of rows so the [B*T, Vp] logits are never
// stored whole. With `backward`, each chunk's logits become their gradient in place and flow
// straight into dlnf and dwte.
double GPT::classifier(const int32_t* targets, bool backward, int64_t* count) {
  const GPTShape& s = shape_;
  const int64_t BT = int64_t(run_.B) * run_.T();
  std::memcpy(targets_.data, targets, size_t(BT) * 4);
  int64_t valid = 0;
  for (int64_t i = 0; i < BT; ++i) {
    if (targets[i] >= s.V)
      throw_user_error("target token id {} at position {} is outside the vocabulary [0, {})", targets[i], i, s.V);
    valid += targets[i] >= 0;
  }
  if (backward) ops::fill_zero(ctx_, dlnf_);
  const int64_t chunk = logits_.shape[0];
  for (int64_t r = 0; r < BT; r += chunk) {
    const int64_t n = std::min(chunk, BT - r);
    Tensor logits = logits_.rows(0, n);
    Tensor lnf = lnf_.rows(r, n);
    ops::matmul_forward(ctx_, logits, lnf, params_.wte(), Tensor());
    ops::crossentropy_forward_backward(ctx_, losses_.rows(r, n), logits, targets_.rows(r, n), s.V, backward ? 1.f : 0.f);
    if (backward) ops::matmul_backward(ctx_, dlnf_.rows(r, n), grads_.wte(), Tensor(), logits, lnf, params_.wte());
  }
  double sum = 0;
  const float* l = losses_.f32();
  for (int64_t i = 0; i < BT; ++i) sum += l[i];
  *count = valid;
  return sum;
}

// ---- backward ---------------------------------------------------------------------------------

void GPT::attention_backward(Layer& a, int l, Tensor dres) {
  const GPTShape& s = shape_;
  const int B = run_.B, T = run_.T(), d = s.d;
  auto& p = params_;
  auto& g = grads_;
  // out = att · Wo + b: d(att) = dres · Wo
  ops::fill_zero(ctx_, datt_);
  ops::matmul_backward(ctx_, datt_, layer_slice(g.attprojw(), l), layer_slice(g.attprojb(), l), dres, a.att,
                       layer_slice(p.attprojw(), l));
  if (run_.P > 1) {
    // backward of #2: [B, N/P, Hq, d] -> [B, N, hq, d]
    ulysses_->all_to_all_out_heads_to_seq(ctx_, datt_full_, datt_.reshape({B, T, s.Hq, d}));
  }
  ops::attention_backward(ctx_, dqkv_full_, datt_full_, a.qkv_full, a.att_full, a.lse, hq_, hkv_);
  Tensor dqkv = dqkv_full_;
  if (run_.P > 1) {
    // backward of #1: [B, N, hq + 2hkv, d] -> [B, N/P, Hq + 2Hkv, d]
    ulysses_->all_to_all_qkv_seq_to_heads(ctx_, dqkv_local_, dqkv_full_);
    dqkv = dqkv_local_;
  }
  if (s.rope) ops::rope_backward(ctx_, dqkv, 0, s.Hq + s.Hkv, positions_, s.rope_theta);
  // qkv = ln1 · Wqkv + b
  ops::fill_zero(ctx_, dln_);
  ops::matmul_backward(ctx_, dln_, layer_slice(g.qkvw(), l), layer_slice(g.qkvb(), l),
                       dqkv.reshape({int64_t(B) * T, int64_t(s.qkv_heads()) * d}), a.ln1, layer_slice(p.qkvw(), l));
}

void GPT::backward() {
  const GPTShape& s = shape_;
  auto& p = params_;
  auto& g = grads_;
  // dres: the gradient of the residual stream, walked from the top down
  ops::fill_zero(ctx_, dres_);
  const Tensor top = s.L > 0 ? layers_[s.L - 1].residual3 : encoded_;
  ops::layernorm_backward(ctx_, dres_, g.lnfw(), g.lnfb(), dlnf_, top, p.lnfw(), lnf_mean_, lnf_rstd_);
  for (int l = s.L - 1; l >= 0; --l) {
    Layer& a = layers_[l];
    const Tensor x = l > 0 ? layers_[l - 1].residual3 : encoded_;
    // MLP block: residual3 = residual2 + W2 · gelu(W1 · LN2(residual2))
    ops::fill_zero(ctx_, dfch_gelu_);
    ops::matmul_backward(ctx_, dfch_gelu_, layer_slice(g.fcprojw(), l), layer_slice(g.fcprojb(), l), dres_, a.fch_gelu,
                         layer_slice(p.fcprojw(), l));
    ops::fill_zero(ctx_, dfch_);
    ops::gelu_backward(ctx_, dfch_, a.fch, dfch_gelu_);
    ops::fill_zero(ctx_, dln_);
    ops::matmul_backward(ctx_, dln_, layer_slice(g.fcw(), l), layer_slice(g.fcb(), l), dfch_, a.ln2,
                         layer_slice(p.fcw(), l));
    ops::layernorm_backward(ctx_, dres_, layer_slice(g.ln2w(), l), layer_slice(g.ln2b(), l), dln_, a.residual2,
                            layer_slice(p.ln2w(), l), a.ln2_mean, a.ln2_rstd);
    // attention block: residual2 = x + Wo · attention(LN1(x)); leaves d(LN1 out) in dln_
    attention_backward(a, l, dres_);
    ops::layernorm_backward(ctx_, dres_, layer_slice(g.ln1w(), l), layer_slice(g.ln1b(), l), dln_, x,
                            layer_slice(p.ln1w(), l), a.ln1_mean, a.ln1_rstd);
  }
  ops::embedding_backward(ctx_, g.wte(), s.rope ? Tensor() : g.wpe(), dres_, tokens_, positions_);
}

double GPT::forward_backward(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count) {
  ULYSSES_ASSERT(!grads_flat_.empty(), "this model instance has no gradients");
  forward(tokens, positions);
  const double loss = classifier(targets, /*backward=*/true, count);
  backward();
  return loss;
}

double GPT::forward_loss(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count) {
  forward(tokens, positions);
  return classifier(targets, /*backward=*/false, count);
}

void GPT::forward_logits(const int32_t* tokens, const int32_t* positions, int64_t row, float* logits) {
  forward(tokens, positions);
  Tensor out = logits_.rows(0, 1);
  ops::matmul_forward(ctx_, out, lnf_.rows(row, 1), params_.wte(), Tensor());
  std::memcpy(logits, out.data, size_t(shape_.Vp) * 4);
}

}  // namespace ulysses
