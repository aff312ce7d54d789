// Device dispatch for kernels/ops.h: checks shapes, then calls the CPU reference (fp32) or the
// CUDA kernel (bf16) for the tensors' device.
#include "kernels/ops.h"

#include <cstring>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"

namespace ulysses::ops {

namespace {
// The model's CUDA path is wired op by op in the CUDA backend work; until an op is, reaching it
// on a cuda tensor is an error that says so rather than a silent wrong answer.
[[noreturn]] void no_cuda(const char* op) {
  throw std::runtime_error(fmt::format("op {}: the CUDA implementation is not wired into the model yet", op));
}
#define ULYSSES_CPU_ONLY(ctx, op) \
  if ((ctx).device != Device::cpu) no_cuda(op)

const float* cf(const Tensor& t) { return t.empty() ? nullptr : t.f32(); }
float* mf(const Tensor& t) { return t.empty() ? nullptr : t.f32(); }
const int32_t* ci(const Tensor& t) { return t.empty() ? nullptr : t.i32(); }
int last(const Tensor& t) { return int(t.shape[t.ndim - 1]); }
int64_t rows(const Tensor& t) { return t.numel() / last(t); }
}  // namespace

// ---- context and data movement ----------------------------------------------------------------

#ifndef ULYSSES_CUDA
Context::Context(Device d) : device(d) {
  if (d == Device::cuda) throw std::runtime_error("a cuda context, but ulysses was built without CUDA");
}
Context::~Context() = default;
void* Context::stream() const { return nullptr; }
#endif
Context::Context(Context&& o) noexcept : device(o.device), cuda(o.cuda), cudnn_attention(o.cudnn_attention) {
  o.cuda = nullptr;
}
Context& Context::operator=(Context&& o) noexcept {
  if (this != &o) {
    this->~Context();
    new (this) Context(std::move(o));
  }
  return *this;
}

void copy(Context& ctx, Tensor dst, Tensor src) {
  ULYSSES_ASSERT(dst.dtype == src.dtype && dst.numel() == src.numel(), "copy: {} <- {}", dst.describe(),
                 src.describe());
  if (dst.device == Device::cpu && src.device == Device::cpu) {
    if (!src.empty()) std::memmove(dst.data, src.data, src.bytes());
    return;
  }
  ULYSSES_CPU_ONLY(ctx, "copy");
  no_cuda("copy");
}

void synchronize(Context& ctx) {
  if (ctx.device == Device::cpu) return;
  no_cuda("synchronize");
}

void cast(Context& ctx, Tensor dst, Tensor src) {
  ULYSSES_CPU_ONLY(ctx, "cast");
  ULYSSES_ASSERT(dst.numel() == src.numel() && dst.device == src.device, "cast: {} <- {}", dst.describe(),
                 src.describe());
  if (dst.dtype == DType::f32 && src.dtype == DType::f32) {
    copy(ctx, dst, src);
    return;
  }
  throw std::runtime_error(fmt::format("cast: {} <- {} is not supported on cpu", dst.describe(), src.describe()));
}

double sum(Context& ctx, Tensor x) {
  ULYSSES_CPU_ONLY(ctx, "sum");
  const float* p = cf(x);
  double s = 0;
  for (int64_t i = 0; i < x.numel(); ++i) s += p[i];
  return s;
}

void embedding_forward(Context& ctx, Tensor out, Tensor tokens, Tensor positions, Tensor wte, Tensor wpe) {
  ULYSSES_CPU_ONLY(ctx, "embedding_forward");
  ULYSSES_ASSERT(tokens.numel() == rows(out) && positions.numel() == rows(out), "embedding: {} vs {}",
                 tokens.describe(), out.describe());
  cpu::embedding_forward(mf(out), ci(tokens), ci(positions), cf(wte), cf(wpe), rows(out), last(out));
}

void embedding_backward(Context& ctx, Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, Tensor positions) {
  ULYSSES_CPU_ONLY(ctx, "embedding_backward");
  cpu::embedding_backward(mf(dwte), mf(dwpe), cf(dout), ci(tokens), ci(positions), rows(dout), last(dout));
}

void layernorm_forward(Context& ctx, Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias) {
  ULYSSES_CPU_ONLY(ctx, "layernorm_forward");
  ULYSSES_ASSERT(out.numel() == inp.numel() && mean.numel() == rows(inp) && weight.numel() == last(inp),
                 "layernorm: out {} inp {} mean {} weight {}", out.describe(), inp.describe(), mean.describe(),
                 weight.describe());
  cpu::layernorm_forward(mf(out), mf(mean), mf(rstd), cf(inp), cf(weight), cf(bias), rows(inp), last(inp));
}

void layernorm_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd) {
  ULYSSES_CPU_ONLY(ctx, "layernorm_backward");
  cpu::layernorm_backward(mf(dinp), mf(dweight), mf(dbias), cf(dout), cf(inp), cf(weight), cf(mean), cf(rstd),
                          rows(inp), last(inp));
}

void matmul_forward(Context& ctx, Tensor out, Tensor inp, Tensor weight, Tensor bias) {
  ULYSSES_CPU_ONLY(ctx, "matmul_forward");
  const int IC = last(inp), OC = last(out);
  ULYSSES_ASSERT(weight.numel() == int64_t(IC) * OC && rows(out) == rows(inp) && (bias.empty() || bias.numel() == OC),
                 "matmul: out {} inp {} weight {}", out.describe(), inp.describe(), weight.describe());
  cpu::matmul_forward(mf(out), cf(inp), cf(weight), cf(bias), rows(inp), IC, OC);
}

void matmul_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight) {
  ULYSSES_CPU_ONLY(ctx, "matmul_backward");
  const int IC = last(inp), OC = last(dout);
  ULYSSES_ASSERT(weight.numel() == int64_t(IC) * OC && rows(dout) == rows(inp), "matmul_backward: dout {} inp {} weight {}",
                 dout.describe(), inp.describe(), weight.describe());
  cpu::matmul_backward(mf(dinp), mf(dweight), mf(dbias), cf(dout), cf(inp), cf(weight), rows(inp), IC, OC);
}

void gelu_forward(Context& ctx, Tensor out, Tensor inp) {
  ULYSSES_CPU_ONLY(ctx, "gelu_forward");
  cpu::gelu_forward(mf(out), cf(inp), inp.numel());
}

void gelu_backward(Context& ctx, Tensor dinp, Tensor inp, Tensor dout) {
  ULYSSES_CPU_ONLY(ctx, "gelu_backward");
  cpu::gelu_backward(mf(dinp), cf(inp), cf(dout), inp.numel());
}

void residual_forward(Context& ctx, Tensor out, Tensor a, Tensor b) {
  ULYSSES_CPU_ONLY(ctx, "residual_forward");
  ULYSSES_ASSERT(out.numel() == a.numel() && a.numel() == b.numel(), "residual: {} {} {}", out.describe(),
                 a.describe(), b.describe());
  cpu::residual_forward(mf(out), cf(a), cf(b), out.numel());
}

void rope_forward(Context& ctx, Tensor x, int head_begin, int n_heads, Tensor positions, float base) {
  ULYSSES_CPU_ONLY(ctx, "rope_forward");
  const int d = last(x);
  const int64_t row_stride = x.numel() / positions.numel();
  cpu::rope_forward(mf(x) + int64_t(head_begin) * d, ci(positions), positions.numel(), n_heads, d, row_stride, base);
}

void rope_backward(Context& ctx, Tensor dx, int head_begin, int n_heads, Tensor positions, float base) {
  ULYSSES_CPU_ONLY(ctx, "rope_backward");
  const int d = last(dx);
  const int64_t row_stride = dx.numel() / positions.numel();
  cpu::rope_backward(mf(dx) + int64_t(head_begin) * d, ci(positions), positions.numel(), n_heads, d, row_stride, base);
}

void attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv, int Hq, int Hkv) {
  ULYSSES_CPU_ONLY(ctx, "attention_forward");
  ULYSSES_ASSERT(qkv.ndim == 4 && qkv.shape[2] == Hq + 2 * Hkv, "attention: qkv {} with Hq={} Hkv={}",
                 qkv.describe(), Hq, Hkv);
  const int B = int(qkv.shape[0]), N = int(qkv.shape[1]), d = int(qkv.shape[3]);
  ULYSSES_ASSERT(out.numel() == int64_t(B) * N * Hq * d && lse.numel() == int64_t(B) * Hq * N,
                 "attention: out {} lse {}", out.describe(), lse.describe());
  cpu::attention_forward(mf(out), mf(lse), cf(qkv), B, N, Hq, Hkv, d);
}

void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor out, Tensor lse, int Hq, int Hkv) {
  ULYSSES_CPU_ONLY(ctx, "attention_backward");
  const int B = int(qkv.shape[0]), N = int(qkv.shape[1]), d = int(qkv.shape[3]);
  ULYSSES_ASSERT(dqkv.numel() == qkv.numel() && dout.numel() == out.numel(), "attention_backward: {} {}",
                 dqkv.describe(), dout.describe());
  cpu::attention_backward(mf(dqkv), cf(dout), cf(qkv), cf(out), cf(lse), B, N, Hq, Hkv, d);
}

void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets, int V, float grad_scale) {
  ULYSSES_CPU_ONLY(ctx, "crossentropy_forward_backward");
  ULYSSES_ASSERT(losses.numel() == rows(logits) && targets.numel() == rows(logits) && V <= last(logits),
                 "crossentropy: logits {} losses {} targets {} V={}", logits.describe(), losses.describe(),
                 targets.describe(), V);
  cpu::crossentropy_forward_backward(mf(losses), mf(logits), ci(targets), rows(logits), V, last(logits), grad_scale);
}

void adamw_update(Context& ctx, Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float grad_scale, int t, Tensor param_lowp) {
  ULYSSES_CPU_ONLY(ctx, "adamw_update");
  ULYSSES_ASSERT(param_lowp.empty(), "adamw_update: a low-precision parameter copy on cpu");
  ULYSSES_ASSERT(param.numel() == grad.numel() && m.numel() == param.numel() && v.numel() == param.numel(),
                 "adamw: param {} grad {}", param.describe(), grad.describe());
  cpu::adamw_update(mf(param), cf(grad), mf(m), mf(v), param.numel(), lr, beta1, beta2, eps, weight_decay,
                    grad_scale, t);
}

double sum_squares(Context& ctx, Tensor x) {
  ULYSSES_CPU_ONLY(ctx, "sum_squares");
  return cpu::sum_squares(cf(x), x.numel());
}

void fill_zero(Context& ctx, Tensor x) {
  ULYSSES_CPU_ONLY(ctx, "fill_zero");
  if (!x.empty()) std::memset(x.data, 0, x.bytes());
}

void ulysses_pack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P) {
  ULYSSES_CPU_ONLY(ctx, "ulysses_pack_heads");
  ULYSSES_ASSERT(src.ndim == 4, "ulysses_pack_heads: src {}", src.describe());
  const int B = int(src.shape[0]), T = int(src.shape[1]), Htot = int(src.shape[2]), d = int(src.shape[3]);
  ULYSSES_ASSERT(dst.numel() >= int64_t(B) * T * d * head_offsets[P], "ulysses_pack_heads: dst {}", dst.describe());
  cpu::ulysses_pack_heads(mf(dst), cf(src), heads, head_offsets, P, B, T, Htot, d);
}

void ulysses_unpack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets,
                          int P, bool accumulate) {
  ULYSSES_CPU_ONLY(ctx, "ulysses_unpack_heads");
  ULYSSES_ASSERT(dst.ndim == 4, "ulysses_unpack_heads: dst {}", dst.describe());
  const int B = int(dst.shape[0]), T = int(dst.shape[1]), Htot = int(dst.shape[2]), d = int(dst.shape[3]);
  ULYSSES_ASSERT(src.numel() >= int64_t(B) * T * d * head_offsets[P], "ulysses_unpack_heads: src {}", src.describe());
  cpu::ulysses_unpack_heads(mf(dst), cf(src), heads, head_offsets, P, B, T, Htot, d, accumulate);
}

void ulysses_pack_sequence(Context& ctx, Tensor dst, Tensor src, int P) {
  ULYSSES_CPU_ONLY(ctx, "ulysses_pack_sequence");
  ULYSSES_ASSERT(src.ndim == 4 && src.shape[1] % P == 0 && dst.numel() >= src.numel(), "ulysses_pack_sequence: {} {}",
                 src.describe(), dst.describe());
  cpu::ulysses_pack_sequence(mf(dst), cf(src), P, int(src.shape[0]), int(src.shape[1] / P), int(src.shape[2]),
                             int(src.shape[3]));
}

void ulysses_unpack_sequence(Context& ctx, Tensor dst, Tensor src, int P) {
  ULYSSES_CPU_ONLY(ctx, "ulysses_unpack_sequence");
  ULYSSES_ASSERT(dst.ndim == 4 && dst.shape[1] % P == 0 && src.numel() >= dst.numel(),
                 "ulysses_unpack_sequence: {} {}", dst.describe(), src.describe());
  cpu::ulysses_unpack_sequence(mf(dst), cf(src), P, int(dst.shape[0]), int(dst.shape[1] / P), int(dst.shape[2]),
                               int(dst.shape[3]));
}

}  // namespace ulysses::ops
