// Device dispatch for kernels/ops.h: checks shapes, then calls the CPU reference (fp32) or, for a
// cuda context, the CUDA kernel of kernels/cuda/cuda_ops.h on the context's stream.
// On cuda every tensor is checked to be on cuda with the dtype the kernel expects (the number
// formats at the top of ops.h); a mismatch is a std::runtime_error naming the op, the argument
// and the tensor, e.g. "op gelu_forward: inp must be bf16 on cuda, got f32[4, 64] on cpu".
#include "kernels/ops.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#include <omp.h>

#include "core/base/error.h"
#include "kernels/cpu/cpu_ops.h"
#ifdef ULYSSES_CUDA
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/cuda_state.h"
#endif

namespace ulysses::ops {

namespace {
const float* cf(const Tensor& t) { return t.empty() ? nullptr : t.f32(); }
float* mf(const Tensor& t) { return t.empty() ? nullptr : t.f32(); }
const int32_t* ci(const Tensor& t) { return t.empty() ? nullptr : t.i32(); }
int last(const Tensor& t) { return int(t.shape[t.ndim - 1]); }
int64_t rows(const Tensor& t) { return t.numel() / last(t); }

[[noreturn]] void fail(const char* op, const std::string& why) {
  throw std::runtime_error(fmt::format("op {}: {}", op, why));
}

// Before the CPU reference: a cuda context has returned through its branch by then (and cannot
// exist in a build without CUDA), so this only guards against a context in an unexpected state.
void expect_cpu(const Context& ctx, const char* op) {
  if (ctx.device != Device::cpu) fail(op, fmt::format("no implementation for a {} context", device_name(ctx.device)));
}

#ifdef ULYSSES_CUDA
using cuda::bf16;

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, bf16>) return DType::bf16;
  else return DType::i32;  // int32_t
}

// One op call on a cuda context: its stream, state, and the checked device pointers of its
// tensors. arg<T>(t, "name"): t must be on cuda with the dtype of T (float f32, bf16, int32_t
// i32); opt<T>: the same, or an empty tensor, which gives nullptr (an optional argument).
struct CudaCall {
  CudaCall(Context& ctx, const char* op_name) : op(op_name) {
    if (!ctx.cuda) fail(op, "a cuda context without CUDA state (moved from?)");
    state = ctx.cuda;
    stream = ctx.cuda->stream;
  }
  template <typename T>
  T* arg(const Tensor& t, const char* name) const {
    check(t, name, dtype_of<T>());
    return static_cast<T*>(t.data);
  }
  template <typename T>
  T* opt(const Tensor& t, const char* name) const {
    return t.empty() ? nullptr : arg<T>(t, name);
  }
  void check(const Tensor& t, const char* name, DType want) const {
    if (t.device != Device::cuda || t.dtype != want)
      fail(op, fmt::format("{} must be {} on cuda, got {}", name, dtype_name(want), t.describe()));
    if (t.data == nullptr && t.numel() > 0) fail(op, fmt::format("{} {} has no data", name, t.describe()));
  }
  // Scratch from the context's growable buffer (valid until the next scratch() of this context).
  void* scratch(size_t bytes) const { return state->scratch(bytes); }

  const char* op;
  CudaState* state;
  cudaStream_t stream;
};

// ---- cuDNN attention (ctx.cudnn_attention = true) ---------------------------------------------
// cuDNN SDPA (kernels/cuda/attention_cudnn.h), one object per context, made on first use.
cuda::CudnnAttention& cudnn_attention(const CudaCall& c) {
  if (!c.state->cudnn_attention) c.state->cudnn_attention = std::make_unique<cuda::CudnnAttention>();
  return *c.state->cudnn_attention;
}
void cudnn_attention_forward(const CudaCall& c, bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv,
                             int d) {
  cudnn_attention(c).forward(out, lse, qkv, B, N, Hq, Hkv, d, c.stream);
}
void cudnn_attention_backward(const CudaCall& c, bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out,
                              const float* lse, int B, int N, int Hq, int Hkv, int d) {
  cudnn_attention(c).backward(dqkv, dout, qkv, out, lse, B, N, Hq, Hkv, d, c.stream);
}

// The flash kernels are instantiated for these head dimensions only.
void check_flash_head_dim(const char* op, int d) {
  if (d != 64 && d != 128)
    fail(op, fmt::format("head dimension {} is not supported by the CUDA flash attention kernels (64 or 128)", d));
}
#endif
}  // namespace

// ---- context and data movement ----------------------------------------------------------------

#ifndef ULYSSES_CUDA
Context::Context(Device d) : device(d) {
  if (d == Device::cuda) throw std::runtime_error("a cuda context, but ulysses was built without CUDA");
}
Context::~Context() = default;
void* Context::stream() const { return nullptr; }
#endif
Context::Context(Context&& o) noexcept
    : device(o.device), cuda(o.cuda), cudnn_attention(o.cudnn_attention), cpu_scratch_(std::move(o.cpu_scratch_)) {
  o.cuda = nullptr;
}
Context& Context::operator=(Context&& o) noexcept {
  if (this != &o) {
    this->~Context();
    new (this) Context(std::move(o));
  }
  return *this;
}

float* Context::cpu_scratch(size_t floats) {
  if (cpu_scratch_.size() < floats) cpu_scratch_.resize(floats);
  return cpu_scratch_.data();
}

void copy(Context& ctx, Tensor dst, Tensor src) {
  ULYSSES_ASSERT(dst.dtype == src.dtype && dst.numel() == src.numel(), "copy: {} <- {}", dst.describe(),
                 src.describe());
  if (dst.device == Device::cpu && src.device == Device::cpu) {
    if (!src.empty()) std::memmove(dst.data, src.data, src.bytes());
    return;
  }
  if (ctx.device != Device::cuda)
    fail("copy", fmt::format("{} <- {} needs a cuda context", dst.describe(), src.describe()));
#ifdef ULYSSES_CUDA
  const CudaCall c(ctx, "copy");
  if (src.empty()) return;
  if (dst.data == nullptr) fail("copy", fmt::format("dst {} has no data", dst.describe()));
  CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDefault, c.stream));
#endif
}

void synchronize(Context& ctx) {
  if (ctx.device == Device::cpu) return;
#ifdef ULYSSES_CUDA
  const CudaCall c(ctx, "synchronize");
  CUDA_CHECK(cudaStreamSynchronize(c.stream));
#endif
}

void cast(Context& ctx, Tensor dst, Tensor src) {
  ULYSSES_ASSERT(dst.numel() == src.numel() && dst.device == src.device, "cast: {} <- {}", dst.describe(),
                 src.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "cast");
    if (dst.dtype == src.dtype && (dst.dtype == DType::f32 || dst.dtype == DType::bf16)) {
      c.check(dst, "dst", dst.dtype);
      c.check(src, "src", src.dtype);
      copy(ctx, dst, src);
    } else if (dst.dtype == DType::bf16 && src.dtype == DType::f32) {
      cuda::cast_f32_to_bf16(c.arg<bf16>(dst, "dst"), c.arg<float>(src, "src"), src.numel(), c.stream);
    } else if (dst.dtype == DType::f32 && src.dtype == DType::bf16) {
      cuda::cast_bf16_to_f32(c.arg<float>(dst, "dst"), c.arg<bf16>(src, "src"), src.numel(), c.stream);
    } else {
      fail("cast", fmt::format("{} <- {} is not supported on cuda (f32 <-> bf16 only)", dst.describe(),
                               src.describe()));
    }
    return;
  }
#endif
  if (dst.dtype == DType::f32 && src.dtype == DType::f32) {
    copy(ctx, dst, src);
    return;
  }
  throw std::runtime_error(fmt::format("cast: {} <- {} is not supported on cpu", dst.describe(), src.describe()));
}

double sum(Context& ctx, Tensor x) {
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "sum");
    cuda::sum(c.state->reduce_result, c.arg<float>(x, "x"), x.numel(), c.state->reduce_partials, c.stream);
    CUDA_CHECK(cudaMemcpyAsync(c.state->reduce_host, c.state->reduce_result, sizeof(double), cudaMemcpyDeviceToHost,
                               c.stream));
    CUDA_CHECK(cudaStreamSynchronize(c.stream));  // documented: sum returns to the host
    return *c.state->reduce_host;
  }
#endif
  expect_cpu(ctx, "sum");
  const float* p = cf(x);
  double s = 0;
  for (int64_t i = 0; i < x.numel(); ++i) s += p[i];
  return s;
}

// ---- model ops --------------------------------------------------------------------------------

void embedding_forward(Context& ctx, Tensor out, Tensor tokens, Tensor positions, Tensor wte, Tensor wpe) {
  ULYSSES_ASSERT(tokens.numel() == rows(out) && positions.numel() == rows(out), "embedding: {} vs {}",
                 tokens.describe(), out.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "embedding_forward");
    cuda::embedding_forward(c.arg<bf16>(out, "out"), c.arg<int32_t>(tokens, "tokens"),
                            c.arg<int32_t>(positions, "positions"), c.arg<bf16>(wte, "wte"), c.opt<bf16>(wpe, "wpe"),
                            rows(out), last(out), c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "embedding_forward");
  cpu::embedding_forward(mf(out), ci(tokens), ci(positions), cf(wte), cf(wpe), rows(out), last(out));
}

void embedding_backward(Context& ctx, Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, Tensor positions) {
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "embedding_backward");
    const int64_t R = rows(dout);
    const int C = last(dout);
    ULYSSES_ASSERT(tokens.numel() == R && positions.numel() == R && dwte.ndim == 2 && dwte.shape[1] == C &&
                       (dwpe.empty() || (dwpe.ndim == 2 && dwpe.shape[1] == C)),
                   "embedding_backward: dwte {} dwpe {} dout {} tokens {}", dwte.describe(), dwpe.describe(),
                   dout.describe(), tokens.describe());
    float* dwte_p = c.arg<float>(dwte, "dwte");
    float* dwpe_p = c.opt<float>(dwpe, "dwpe");
    const bf16* dout_p = c.arg<bf16>(dout, "dout");
    const int32_t* tokens_p = c.arg<int32_t>(tokens, "tokens");
    const int32_t* positions_p = dwpe_p ? c.arg<int32_t>(positions, "positions") : nullptr;
    const int vocab = int(dwte.shape[0]), max_positions = dwpe_p ? int(dwpe.shape[0]) : 0;
    if (R == 0) return;
    const size_t scratch_bytes = cuda::embedding_backward_scratch_bytes(R);
    cuda::embedding_backward(dwte_p, dwpe_p, dout_p, tokens_p, positions_p, R, C, vocab, max_positions,
                             c.scratch(scratch_bytes), scratch_bytes, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "embedding_backward");
  cpu::embedding_backward(mf(dwte), mf(dwpe), cf(dout), ci(tokens), ci(positions), rows(dout), last(dout));
}

void layernorm_forward(Context& ctx, Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias) {
  ULYSSES_ASSERT(out.numel() == inp.numel() && mean.numel() == rows(inp) && weight.numel() == last(inp),
                 "layernorm: out {} inp {} mean {} weight {}", out.describe(), inp.describe(), mean.describe(),
                 weight.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "layernorm_forward");
    ULYSSES_ASSERT(rstd.numel() == rows(inp) && bias.numel() == last(inp), "layernorm: rstd {} bias {}",
                   rstd.describe(), bias.describe());
    cuda::layernorm_forward(c.arg<bf16>(out, "out"), c.arg<float>(mean, "mean"), c.arg<float>(rstd, "rstd"),
                            c.arg<bf16>(inp, "inp"), c.arg<bf16>(weight, "weight"), c.arg<bf16>(bias, "bias"),
                            rows(inp), last(inp), c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "layernorm_forward");
  cpu::layernorm_forward(mf(out), mf(mean), mf(rstd), cf(inp), cf(weight), cf(bias), rows(inp), last(inp));
}

void layernorm_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd) {
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "layernorm_backward");
    const int64_t R = rows(inp);
    const int C = last(inp);
    ULYSSES_ASSERT(dout.numel() == inp.numel() && (dinp.empty() || dinp.numel() == inp.numel()) &&
                       weight.numel() == C && mean.numel() == R && rstd.numel() == R &&
                       (dweight.empty() || dweight.numel() == C) && (dbias.empty() || dbias.numel() == C),
                   "layernorm_backward: dinp {} dout {} inp {} weight {} mean {}", dinp.describe(), dout.describe(),
                   inp.describe(), weight.describe(), mean.describe());
    bf16* dinp_p = c.opt<bf16>(dinp, "dinp");
    float* dweight_p = c.opt<float>(dweight, "dweight");
    float* dbias_p = c.opt<float>(dbias, "dbias");
    const bf16* dout_p = c.arg<bf16>(dout, "dout");
    const bf16* inp_p = c.arg<bf16>(inp, "inp");
    const bf16* weight_p = c.arg<bf16>(weight, "weight");
    const float* mean_p = c.arg<float>(mean, "mean");
    const float* rstd_p = c.arg<float>(rstd, "rstd");
    if (R == 0) return;
    void* scratch = (dweight_p || dbias_p) ? c.scratch(cuda::layernorm_backward_scratch_bytes(C)) : nullptr;
    cuda::layernorm_backward(dinp_p, dweight_p, dbias_p, dout_p, inp_p, weight_p, mean_p, rstd_p, R, C, scratch,
                             c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "layernorm_backward");
  cpu::layernorm_backward(mf(dinp), mf(dweight), mf(dbias), cf(dout), cf(inp), cf(weight), cf(mean), cf(rstd),
                          rows(inp), last(inp));
}

void matmul_forward(Context& ctx, Tensor out, Tensor inp, Tensor weight, Tensor bias) {
  const int IC = last(inp), OC = last(out);
  ULYSSES_ASSERT(weight.numel() == int64_t(IC) * OC && rows(out) == rows(inp) && (bias.empty() || bias.numel() == OC),
                 "matmul: out {} inp {} weight {}", out.describe(), inp.describe(), weight.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "matmul_forward");
    if (IC % 8 != 0 || OC % 8 != 0)
      fail(c.op, fmt::format("on cuda IC and OC must be multiples of 8 (cuBLASLt's 16-byte alignment), got IC={} "
                             "OC={} (inp {}, out {})", IC, OC, inp.describe(), out.describe()));
    cuda::matmul_forward(*c.state->matmul, c.arg<bf16>(out, "out"), c.arg<bf16>(inp, "inp"),
                         c.arg<bf16>(weight, "weight"), c.opt<bf16>(bias, "bias"), rows(inp), IC, OC, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "matmul_forward");
  cpu::matmul_forward(mf(out), cf(inp), cf(weight), cf(bias), rows(inp), IC, OC);
}

void matmul_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight) {
  const int IC = last(inp), OC = last(dout);
  ULYSSES_ASSERT(weight.numel() == int64_t(IC) * OC && rows(dout) == rows(inp), "matmul_backward: dout {} inp {} weight {}",
                 dout.describe(), inp.describe(), weight.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "matmul_backward");
    ULYSSES_ASSERT((dinp.empty() || dinp.numel() == inp.numel()) &&
                       (dweight.empty() || dweight.numel() == weight.numel()) && (dbias.empty() || dbias.numel() == OC),
                   "matmul_backward: dinp {} dweight {} dbias {}", dinp.describe(), dweight.describe(),
                   dbias.describe());
    if (IC % 8 != 0 || OC % 8 != 0)
      fail(c.op, fmt::format("on cuda IC and OC must be multiples of 8 (cuBLASLt's 16-byte alignment), got IC={} "
                             "OC={} (inp {}, dout {})", IC, OC, inp.describe(), dout.describe()));
    bf16* dinp_p = c.opt<bf16>(dinp, "dinp");
    float* dweight_p = c.opt<float>(dweight, "dweight");
    float* dbias_p = c.opt<float>(dbias, "dbias");
    const bf16* dout_p = c.arg<bf16>(dout, "dout");
    const bf16* inp_p = c.arg<bf16>(inp, "inp");
    const bf16* weight_p = c.arg<bf16>(weight, "weight");
    const int64_t M = rows(inp);
    if (M == 0) return;
    // the bias gradient through bias_backward with the context scratch (any OC), not the
    // MatmulContext's fixed-size bias scratch
    cuda::matmul_backward(*c.state->matmul, dinp_p, dweight_p, nullptr, dout_p, inp_p, weight_p, M, IC, OC, c.stream);
    if (dbias_p)
      cuda::bias_backward(dbias_p, dout_p, M, OC, c.scratch(cuda::bias_backward_scratch_bytes(OC)), c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "matmul_backward");
  cpu::matmul_backward(mf(dinp), mf(dweight), mf(dbias), cf(dout), cf(inp), cf(weight), rows(inp), IC, OC);
}

void gelu_forward(Context& ctx, Tensor out, Tensor inp) {
  ULYSSES_ASSERT(out.numel() == inp.numel(), "gelu: {} {}", out.describe(), inp.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "gelu_forward");
    cuda::gelu_forward(c.arg<bf16>(out, "out"), c.arg<bf16>(inp, "inp"), inp.numel(), c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "gelu_forward");
  cpu::gelu_forward(mf(out), cf(inp), inp.numel());
}

void gelu_backward(Context& ctx, Tensor dinp, Tensor inp, Tensor dout) {
  ULYSSES_ASSERT(dinp.numel() == inp.numel() && dout.numel() == inp.numel(), "gelu_backward: {} {} {}",
                 dinp.describe(), inp.describe(), dout.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "gelu_backward");
    cuda::gelu_backward(c.arg<bf16>(dinp, "dinp"), c.arg<bf16>(inp, "inp"), c.arg<bf16>(dout, "dout"), inp.numel(),
                        c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "gelu_backward");
  cpu::gelu_backward(mf(dinp), cf(inp), cf(dout), inp.numel());
}

void residual_forward(Context& ctx, Tensor out, Tensor a, Tensor b) {
  ULYSSES_ASSERT(out.numel() == a.numel() && a.numel() == b.numel(), "residual: {} {} {}", out.describe(),
                 a.describe(), b.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "residual_forward");
    cuda::residual_forward(c.arg<bf16>(out, "out"), c.arg<bf16>(a, "a"), c.arg<bf16>(b, "b"), out.numel(), c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "residual_forward");
  cpu::residual_forward(mf(out), cf(a), cf(b), out.numel());
}

void matmul_gelu_forward(Context& ctx, Tensor out_gelu, Tensor pre_gelu, Tensor inp, Tensor weight, Tensor bias) {
  const int IC = last(inp), OC = last(pre_gelu);
  ULYSSES_ASSERT(weight.numel() == int64_t(IC) * OC && rows(pre_gelu) == rows(inp) &&
                     out_gelu.numel() == pre_gelu.numel() && (bias.empty() || bias.numel() == OC) &&
                     (pre_gelu.numel() == 0 || out_gelu.data != pre_gelu.data),
                 "matmul_gelu: out_gelu {} pre_gelu {} inp {} weight {} bias {} (out_gelu must not alias pre_gelu)",
                 out_gelu.describe(), pre_gelu.describe(), inp.describe(), weight.describe(), bias.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "matmul_gelu_forward");
    if (IC % 8 != 0 || OC % 8 != 0)
      fail(c.op, fmt::format("on cuda IC and OC must be multiples of 8 (cuBLASLt's 16-byte alignment), got IC={} "
                             "OC={} (inp {}, pre_gelu {})", IC, OC, inp.describe(), pre_gelu.describe()));
    // out [M, OC] = gelu(pre), pre = inp · W^T + b: one GEMM, the GELU_AUX epilogue writes both
    cuda::matmul_forward(*c.state->matmul, c.arg<bf16>(out_gelu, "out_gelu"), c.arg<bf16>(inp, "inp"),
                         c.arg<bf16>(weight, "weight"), c.opt<bf16>(bias, "bias"), rows(inp), IC, OC, c.stream,
                         c.arg<bf16>(pre_gelu, "pre_gelu"));
    return;
  }
#endif
  expect_cpu(ctx, "matmul_gelu_forward");
  cpu::matmul_forward(mf(pre_gelu), cf(inp), cf(weight), cf(bias), rows(inp), IC, OC);
  cpu::gelu_forward(mf(out_gelu), cf(pre_gelu), pre_gelu.numel());
}

void residual_layernorm_forward(Context& ctx, Tensor residual_out, Tensor ln_out, Tensor mean, Tensor rstd, Tensor a,
                                Tensor b, Tensor weight, Tensor bias) {
  const int64_t R = rows(residual_out);
  const int C = last(residual_out);
  ULYSSES_ASSERT(a.numel() == residual_out.numel() && b.numel() == residual_out.numel() &&
                     ln_out.numel() == residual_out.numel() && mean.numel() == R && rstd.numel() == R &&
                     weight.numel() == C && bias.numel() == C &&
                     (residual_out.numel() == 0 || ln_out.data != residual_out.data),
                 "residual_layernorm: residual_out {} ln_out {} mean {} a {} b {} weight {} (ln_out must not alias "
                 "residual_out)",
                 residual_out.describe(), ln_out.describe(), mean.describe(), a.describe(), b.describe(),
                 weight.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "residual_layernorm_forward");
    cuda::fused_residual_layernorm_forward(c.arg<bf16>(residual_out, "residual_out"), c.arg<bf16>(ln_out, "ln_out"),
                                           c.arg<float>(mean, "mean"), c.arg<float>(rstd, "rstd"),
                                           c.arg<bf16>(a, "a"), c.arg<bf16>(b, "b"), c.arg<bf16>(weight, "weight"),
                                           c.arg<bf16>(bias, "bias"), R, C, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "residual_layernorm_forward");
  cpu::residual_forward(mf(residual_out), cf(a), cf(b), residual_out.numel());
  cpu::layernorm_forward(mf(ln_out), mf(mean), mf(rstd), cf(residual_out), cf(weight), cf(bias), R, C);
}

// x [R, Htot, d] (viewed as R rows of row_stride = Htot * d elements); heads
// [head_begin, head_begin + n_heads) of every row are rotated.
void rope_forward(Context& ctx, Tensor x, int head_begin, int n_heads, Tensor positions, float base) {
  if (positions.numel() == 0) return;
  const int d = last(x);
  const int64_t row_stride = x.numel() / positions.numel();
  ULYSSES_ASSERT(x.numel() % positions.numel() == 0 && head_begin >= 0 &&
                     int64_t(head_begin + n_heads) * d <= row_stride,
                 "rope: x {} positions {} heads [{}, {})", x.describe(), positions.describe(), head_begin,
                 head_begin + n_heads);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "rope_forward");
    cuda::rope_forward(c.arg<bf16>(x, "x") + int64_t(head_begin) * d, c.arg<int32_t>(positions, "positions"),
                       positions.numel(), n_heads, d, row_stride, base, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "rope_forward");
  cpu::rope_forward(mf(x) + int64_t(head_begin) * d, ci(positions), positions.numel(), n_heads, d, row_stride, base);
}

void rope_backward(Context& ctx, Tensor dx, int head_begin, int n_heads, Tensor positions, float base) {
  if (positions.numel() == 0) return;
  const int d = last(dx);
  const int64_t row_stride = dx.numel() / positions.numel();
  ULYSSES_ASSERT(dx.numel() % positions.numel() == 0 && head_begin >= 0 &&
                     int64_t(head_begin + n_heads) * d <= row_stride,
                 "rope_backward: dx {} positions {} heads [{}, {})", dx.describe(), positions.describe(), head_begin,
                 head_begin + n_heads);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "rope_backward");
    cuda::rope_backward(c.arg<bf16>(dx, "dx") + int64_t(head_begin) * d, c.arg<int32_t>(positions, "positions"),
                        positions.numel(), n_heads, d, row_stride, base, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "rope_backward");
  cpu::rope_backward(mf(dx) + int64_t(head_begin) * d, ci(positions), positions.numel(), n_heads, d, row_stride, base);
}

void attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv, int Hq, int Hkv) {
  ULYSSES_ASSERT(qkv.ndim == 4 && qkv.shape[2] == Hq + 2 * Hkv, "attention: qkv {} with Hq={} Hkv={}",
                 qkv.describe(), Hq, Hkv);
  const int B = int(qkv.shape[0]), N = int(qkv.shape[1]), d = int(qkv.shape[3]);
  ULYSSES_ASSERT(out.numel() == int64_t(B) * N * Hq * d && lse.numel() == int64_t(B) * Hq * N,
                 "attention: out {} lse {}", out.describe(), lse.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "attention_forward");
    if (Hkv <= 0 || Hq % Hkv != 0) fail(c.op, fmt::format("Hq={} is not a multiple of Hkv={}", Hq, Hkv));
    bf16* out_p = c.arg<bf16>(out, "out");
    float* lse_p = c.arg<float>(lse, "lse");
    const bf16* qkv_p = c.arg<bf16>(qkv, "qkv");
    if (ctx.cudnn_attention) {
      cudnn_attention_forward(c, out_p, lse_p, qkv_p, B, N, Hq, Hkv, d);
      return;
    }
    check_flash_head_dim(c.op, d);
    cuda::attention_forward(out_p, lse_p, qkv_p, B, N, Hq, Hkv, d, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "attention_forward");
  const size_t floats = cpu::attention_forward_scratch_floats(B, N, Hq, Hkv, d, omp_get_max_threads());
  cpu::attention_forward(mf(out), mf(lse), cf(qkv), B, N, Hq, Hkv, d, ctx.cpu_scratch(floats), floats);
}

void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor out, Tensor lse, int Hq, int Hkv) {
  ULYSSES_ASSERT(qkv.ndim == 4 && qkv.shape[2] == Hq + 2 * Hkv, "attention_backward: qkv {} with Hq={} Hkv={}",
                 qkv.describe(), Hq, Hkv);
  const int B = int(qkv.shape[0]), N = int(qkv.shape[1]), d = int(qkv.shape[3]);
  ULYSSES_ASSERT(dqkv.numel() == qkv.numel() && dout.numel() == out.numel() && out.numel() == int64_t(B) * N * Hq * d &&
                     lse.numel() == int64_t(B) * Hq * N,
                 "attention_backward: dqkv {} dout {} out {} lse {}", dqkv.describe(), dout.describe(), out.describe(),
                 lse.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "attention_backward");
    if (Hkv <= 0 || Hq % Hkv != 0) fail(c.op, fmt::format("Hq={} is not a multiple of Hkv={}", Hq, Hkv));
    bf16* dqkv_p = c.arg<bf16>(dqkv, "dqkv");
    const bf16* dout_p = c.arg<bf16>(dout, "dout");
    const bf16* qkv_p = c.arg<bf16>(qkv, "qkv");
    const bf16* out_p = c.arg<bf16>(out, "out");
    const float* lse_p = c.arg<float>(lse, "lse");
    if (ctx.cudnn_attention) {
      cudnn_attention_backward(c, dqkv_p, dout_p, qkv_p, out_p, lse_p, B, N, Hq, Hkv, d);
      return;
    }
    check_flash_head_dim(c.op, d);
    const size_t scratch_bytes = cuda::attention_backward_scratch_bytes(B, N, Hq);
    cuda::attention_backward(dqkv_p, dout_p, qkv_p, out_p, lse_p, B, N, Hq, Hkv, d, c.scratch(scratch_bytes),
                             scratch_bytes, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "attention_backward");
  const size_t floats = cpu::attention_backward_scratch_floats(B, N, Hq, Hkv, d, omp_get_max_threads());
  cpu::attention_backward(mf(dqkv), cf(dout), cf(qkv), cf(out), cf(lse), B, N, Hq, Hkv, d, ctx.cpu_scratch(floats),
                          floats);
}

void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets, int V, float grad_scale) {
  ULYSSES_ASSERT(losses.numel() == rows(logits) && targets.numel() == rows(logits) && V <= last(logits),
                 "crossentropy: logits {} losses {} targets {} V={}", logits.describe(), losses.describe(),
                 targets.describe(), V);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "crossentropy_forward_backward");
    cuda::crossentropy_forward_backward(c.arg<float>(losses, "losses"), c.arg<bf16>(logits, "logits"),
                                        c.arg<int32_t>(targets, "targets"), rows(logits), V, last(logits), grad_scale,
                                        c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "crossentropy_forward_backward");
  cpu::crossentropy_forward_backward(mf(losses), mf(logits), ci(targets), rows(logits), V, last(logits), grad_scale);
}

// ---- optimizer, norms, memory -----------------------------------------------------------------

void adamw_update(Context& ctx, Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float grad_scale, int t, Tensor param_lowp) {
  ULYSSES_ASSERT(param.numel() == grad.numel() && m.numel() == param.numel() && v.numel() == param.numel(),
                 "adamw: param {} grad {}", param.describe(), grad.describe());
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "adamw_update");
    ULYSSES_ASSERT(param_lowp.empty() || param_lowp.numel() == param.numel(), "adamw: param {} param_lowp {}",
                   param.describe(), param_lowp.describe());
    float* master = c.arg<float>(param, "param");
    bf16* lowp = c.opt<bf16>(param_lowp, "param_lowp");
    float* m_p = c.arg<float>(m, "m");
    float* v_p = c.arg<float>(v, "v");
    if (grad.dtype == DType::bf16)
      cuda::adamw_update(master, lowp, c.arg<bf16>(grad, "grad"), m_p, v_p, param.numel(), lr, beta1, beta2, eps,
                         weight_decay, grad_scale, t, c.stream);
    else
      cuda::adamw_update(master, lowp, c.arg<float>(grad, "grad"), m_p, v_p, param.numel(), lr, beta1, beta2, eps,
                         weight_decay, grad_scale, t, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "adamw_update");
  ULYSSES_ASSERT(param_lowp.empty(), "adamw_update: a low-precision parameter copy on cpu");
  cpu::adamw_update(mf(param), cf(grad), mf(m), mf(v), param.numel(), lr, beta1, beta2, eps, weight_decay,
                    grad_scale, t);
}

double sum_squares(Context& ctx, Tensor x) {
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "sum_squares");
    double* result = c.state->reduce_result;
    if (x.dtype == DType::bf16)
      cuda::sum_squares(result, c.arg<bf16>(x, "x"), x.numel(), c.state->reduce_partials, c.stream);
    else
      cuda::sum_squares(result, c.arg<float>(x, "x"), x.numel(), c.state->reduce_partials, c.stream);
    CUDA_CHECK(cudaMemcpyAsync(c.state->reduce_host, result, sizeof(double), cudaMemcpyDeviceToHost, c.stream));
    CUDA_CHECK(cudaStreamSynchronize(c.stream));  // documented: sum_squares returns to the host
    return *c.state->reduce_host;
  }
#endif
  expect_cpu(ctx, "sum_squares");
  return cpu::sum_squares(cf(x), x.numel());
}

void fill_zero(Context& ctx, Tensor x) {
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "fill_zero");
    if (x.empty()) return;
    if (x.device != Device::cuda) fail(c.op, fmt::format("x must be on cuda, got {}", x.describe()));
    CUDA_CHECK(cudaMemsetAsync(x.data, 0, x.bytes(), c.stream));
    return;
  }
#endif
  expect_cpu(ctx, "fill_zero");
  // In 1 MiB blocks over the OpenMP threads: zero_grad clears 0.5 GB at 124M parameters, and one
  // thread's memset reaches about 2.5 GB/s on the 2-core development machine (two: about 3.3).
  constexpr int64_t kBlock = int64_t(1) << 20;
  const int64_t bytes = int64_t(x.bytes());
  char* base = static_cast<char*>(x.data);
#pragma omp parallel for schedule(static) if (bytes > 8 * kBlock)
  for (int64_t off = 0; off < bytes; off += kBlock)
    std::memset(base + off, 0, size_t(std::min(kBlock, bytes - off)));
}

// ---- Ulysses layout transforms ------------------------------------------------------------------
// On cuda heads / head_offsets are device arrays: the packed size (head_offsets[P]) cannot be
// checked on the host there.

namespace {
#ifdef ULYSSES_CUDA
// dst and src of a layout transform: on cuda, the same dtype, bf16 or f32.
DType layout_dtype(const CudaCall& c, const Tensor& dst, const Tensor& src) {
  if (src.dtype != DType::bf16 && src.dtype != DType::f32)
    fail(c.op, fmt::format("src must be bf16 or f32, got {}", src.describe()));
  c.check(src, "src", src.dtype);
  c.check(dst, "dst", src.dtype);
  return src.dtype;
}
#endif
}  // namespace

namespace {
// b in [b_begin, b_end), t in [t_begin, t_end): the token rows a pack / unpack call moves
struct RowBox {
  int b_begin, b_end, t_begin, t_end;
};

RowBox row_box(const char* op, int B, int T, const TokenRows* rows) {
  if (!rows) return {0, B, 0, T};
  ULYSSES_ASSERT(rows->b >= 0 && rows->b < B && rows->t_begin >= 0 && rows->t_count >= 0 &&
                     rows->t_begin + rows->t_count <= T,
                 "{}: rows b = {}, t [{}, {}) outside [B = {}, T = {}]", op, rows->b, rows->t_begin,
                 rows->t_begin + rows->t_count, B, T);
  return {rows->b, rows->b + 1, rows->t_begin, rows->t_begin + rows->t_count};
}

void pack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P,
                const TokenRows* rows) {
  ULYSSES_ASSERT(src.ndim == 4, "ulysses_pack_heads: src {}", src.describe());
  const int B = int(src.shape[0]), T = int(src.shape[1]), Htot = int(src.shape[2]), d = int(src.shape[3]);
  const RowBox r = row_box("ulysses_pack_heads", B, T, rows);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "ulysses_pack_heads");
    const DType dt = layout_dtype(c, dst, src);
    cuda::ulysses_pack_heads(dst.data, src.data, dt, heads, head_offsets, P, B, T, Htot, d, r.b_begin, r.b_end,
                             r.t_begin, r.t_end, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "ulysses_pack_heads");
  ULYSSES_ASSERT(dst.numel() >= int64_t(B) * T * d * head_offsets[P], "ulysses_pack_heads: dst {}", dst.describe());
  cpu::ulysses_pack_heads(mf(dst), cf(src), heads, head_offsets, P, B, T, Htot, d, r.b_begin, r.b_end, r.t_begin,
                          r.t_end);
}

void unpack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P,
                  bool accumulate, const TokenRows* rows) {
  ULYSSES_ASSERT(dst.ndim == 4, "ulysses_unpack_heads: dst {}", dst.describe());
  const int B = int(dst.shape[0]), T = int(dst.shape[1]), Htot = int(dst.shape[2]), d = int(dst.shape[3]);
  const RowBox r = row_box("ulysses_unpack_heads", B, T, rows);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "ulysses_unpack_heads");
    const DType dt = layout_dtype(c, dst, src);
    cuda::ulysses_unpack_heads(dst.data, src.data, dt, heads, head_offsets, P, B, T, Htot, d, accumulate, r.b_begin,
                               r.b_end, r.t_begin, r.t_end, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "ulysses_unpack_heads");
  ULYSSES_ASSERT(src.numel() >= int64_t(B) * T * d * head_offsets[P], "ulysses_unpack_heads: src {}", src.describe());
  cpu::ulysses_unpack_heads(mf(dst), cf(src), heads, head_offsets, P, B, T, Htot, d, accumulate, r.b_begin, r.b_end,
                            r.t_begin, r.t_end);
}
}  // namespace

void ulysses_pack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P) {
  pack_heads(ctx, dst, src, heads, head_offsets, P, nullptr);
}

void ulysses_pack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P,
                        TokenRows rows) {
  pack_heads(ctx, dst, src, heads, head_offsets, P, &rows);
}

void ulysses_unpack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets,
                          int P, bool accumulate) {
  unpack_heads(ctx, dst, src, heads, head_offsets, P, accumulate, nullptr);
}

void ulysses_unpack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets,
                          int P, bool accumulate, TokenRows rows) {
  unpack_heads(ctx, dst, src, heads, head_offsets, P, accumulate, &rows);
}

void ulysses_pack_sequence(Context& ctx, Tensor dst, Tensor src, int P) {
  ULYSSES_ASSERT(src.ndim == 4 && src.shape[1] % P == 0 && dst.numel() >= src.numel(), "ulysses_pack_sequence: {} {}",
                 src.describe(), dst.describe());
  const int B = int(src.shape[0]), T = int(src.shape[1] / P), h = int(src.shape[2]), d = int(src.shape[3]);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "ulysses_pack_sequence");
    const DType dt = layout_dtype(c, dst, src);
    cuda::ulysses_pack_sequence(dst.data, src.data, dt, P, B, T, h, d, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "ulysses_pack_sequence");
  cpu::ulysses_pack_sequence(mf(dst), cf(src), P, B, T, h, d);
}

void ulysses_unpack_sequence(Context& ctx, Tensor dst, Tensor src, int P) {
  ULYSSES_ASSERT(dst.ndim == 4 && dst.shape[1] % P == 0 && src.numel() >= dst.numel(),
                 "ulysses_unpack_sequence: {} {}", dst.describe(), src.describe());
  const int B = int(dst.shape[0]), T = int(dst.shape[1] / P), h = int(dst.shape[2]), d = int(dst.shape[3]);
#ifdef ULYSSES_CUDA
  if (ctx.device == Device::cuda) {
    const CudaCall c(ctx, "ulysses_unpack_sequence");
    const DType dt = layout_dtype(c, dst, src);
    cuda::ulysses_unpack_sequence(dst.data, src.data, dt, P, B, T, h, d, c.stream);
    return;
  }
#endif
  expect_cpu(ctx, "ulysses_unpack_sequence");
  cpu::ulysses_unpack_sequence(mf(dst), cf(src), P, B, T, h, d);
}

}  // namespace ulysses::ops
