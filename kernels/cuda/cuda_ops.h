// The CUDA kernels: the mirror of kernels/cpu/cpu_ops.h with the same semantics, layouts and
// gradient conventions, on device memory, every call enqueued on an explicit stream.
//
// Number formats:
//   - activations, weights and activation gradients: bf16 (__nv_bfloat16); every kernel
//     accumulates in fp32;
//   - parameter gradients (dwte, dwpe, dweight, dbias, layernorm dweight/dbias): fp32, so that
//     accumulation over micro-steps does not round at every step;
//   - statistics saved for backward (layernorm mean/rstd, attention lse), losses: fp32;
//   - optimizer: fp32 master weights and moments; the update also writes the bf16 copy.
// Gradient conventions (as on the CPU): parameter gradients and activation gradients named
// dinp ACCUMULATE (+=); forward outputs are OVERWRITTEN; attention's dqkv is overwritten.
// Determinism: every kernel gives bitwise identical results for identical inputs and shapes
// (no floating-point atomics; reductions in a fixed order independent of the GPU model).
// Pointers passed to kernels that use 16-byte vector loads must be 16-byte aligned (arena
// tensors are 256-byte aligned); kernels fall back to scalar code when a row length is not a
// multiple of 8 elements. Nothing here synchronises with the host or allocates, except the
// MatmulContext constructor and the first use of a GEMM shape (a host-side heuristic query).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/base/tensor.h"

namespace ulysses::cuda {

using bf16 = __nv_bfloat16;

// ---- embedding ------------------------------------------------------------------------------
// out[r, :] = wte[tokens[r], :] + (wpe ? wpe[positions[r], :] : 0)          out: [rows, C]
void embedding_forward(bf16* out, const int32_t* tokens, const int32_t* positions, const bf16* wte,
                       const bf16* wpe, int64_t rows, int C, cudaStream_t stream);
// dwte[v] += sum of dout[r] over rows r with tokens[r] == v, summed in increasing r (likewise
// dwpe by positions; dwpe may be null). Deterministic without atomics: the rows are sorted by
// token on the device (a stable radix sort) and one thread block owns each distinct token.
// Needs a scratch buffer of embedding_backward_scratch_bytes(rows) bytes. Token ids must lie in
// [0, vocab_size) and positions in [0, max_positions).
size_t embedding_backward_scratch_bytes(int64_t rows);
void embedding_backward(float* dwte, float* dwpe, const bf16* dout, const int32_t* tokens,
                        const int32_t* positions, int64_t rows, int C, int vocab_size,
                        int max_positions, void* scratch, size_t scratch_bytes, cudaStream_t stream);

// ---- layernorm (eps 1e-5, biased variance) ---------------------------------------------------
// out = (inp - mean) * rstd * weight + bias;  inp, out: [rows, C]; mean, rstd: [rows] (fp32)
void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight,
                       const bf16* bias, int64_t rows, int C, cudaStream_t stream);
// Fused residual + layernorm: residual_out = a + b (rounded to bf16), then
// out = layernorm(residual_out) exactly as layernorm_forward of the rounded residual_out.
// Its backward is layernorm_backward with inp = residual_out and dinp = the residual stream's
// gradient; that gradient is then the gradient of both a and b (the sum passes it through).
void fused_residual_layernorm_forward(bf16* residual_out, bf16* out, float* mean, float* rstd,
                                      const bf16* a, const bf16* b, const bf16* weight,
                                      const bf16* bias, int64_t rows, int C, cudaStream_t stream);
// dinp += ...; dweight += ...; dbias += ...  (dweight, dbias fp32). The column sums over rows
// go through kColumnChunks fixed row chunks (partials in scratch, then summed in chunk order), so
// they are deterministic; scratch: layernorm_backward_scratch_bytes(C) bytes.
constexpr int kColumnChunks = 64;
size_t layernorm_backward_scratch_bytes(int C);
void layernorm_backward(bf16* dinp, float* dweight, float* dbias, const bf16* dout, const bf16* inp,
                        const bf16* weight, const float* mean, const float* rstd, int64_t rows,
                        int C, void* scratch, cudaStream_t stream);

// ---- matmul through cuBLASLt (bf16 inputs, fp32 compute) --------------------------------------
// Owns the cuBLASLt handle, a workspace allocated once, and a cache of heuristic results per
// (shape, layout, epilogue, alignment), and the scratch of bias_backward for up to
// max_bias_columns columns. One per device/stream user; not thread-safe.
class MatmulContext {
 public:
  explicit MatmulContext(size_t workspace_bytes = size_t(32) << 20, int max_bias_columns = 32768);
  ~MatmulContext();
  MatmulContext(const MatmulContext&) = delete;
  MatmulContext& operator=(const MatmulContext&) = delete;
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};
// out[M, OC] = inp[M, IC] · weight[OC, IC]^T + bias[OC]   (bias may be null; bias epilogue).
// With pre_gelu != null: pre_gelu = inp · weight^T + bias and out = gelu(pre_gelu) (tanh GELU,
// cuBLASLt's GELU_AUX epilogue); pre_gelu [M, OC] is what gelu_backward needs.
// IC and OC must be multiples of 8 (cuBLASLt's 16-byte alignment); M is free.
void matmul_forward(MatmulContext& ctx, bf16* out, const bf16* inp, const bf16* weight,
                    const bf16* bias, int64_t M, int IC, int OC, cudaStream_t stream,
                    bf16* pre_gelu = nullptr);
// dinp[M, IC] += dout · weight        (bf16, beta = 1: accumulated in fp32, rounded once to bf16)
// dweight[OC, IC] += dout^T · inp     (fp32 output, beta = 1: exact fp32 accumulation)
// dbias[OC] += column sums of dout    (fp32; a deterministic kernel, since cuBLASLt's BGRADB
//                                      epilogue overwrites and would need a scratch + add)
// Any of dinp, dweight, dbias may be null.
void matmul_backward(MatmulContext& ctx, bf16* dinp, float* dweight, float* dbias, const bf16* dout,
                     const bf16* inp, const bf16* weight, int64_t M, int IC, int OC,
                     cudaStream_t stream);
// dbias[OC] += sum over rows of dout[M, OC], deterministic (fixed row chunks as in
// layernorm_backward); scratch: bias_backward_scratch_bytes(OC) bytes.
size_t bias_backward_scratch_bytes(int OC);
void bias_backward(float* dbias, const bf16* dout, int64_t M, int OC, void* scratch,
                   cudaStream_t stream);

// ---- GELU (tanh approximation) -------------------------------------------------------------------
void gelu_forward(bf16* out, const bf16* inp, int64_t n, cudaStream_t stream);
// dinp += gelu'(inp) * dout  (dinp must not alias inp or dout)
void gelu_backward(bf16* dinp, const bf16* inp, const bf16* dout, int64_t n, cudaStream_t stream);

// ---- residual -----------------------------------------------------------------------------------
// out = a + b (out may alias a or b)
void residual_forward(bf16* out, const bf16* a, const bf16* b, int64_t n, cudaStream_t stream);

// ---- rotary position embedding (rotate-half), in place; see cpu_ops.h --------------------------
// x: [rows, n_heads, d] with a row stride of row_stride elements. Angles are computed in fp64
// and reduced mod 2π before the fp32 sin/cos, so long positions lose no accuracy.
void rope_forward(bf16* x, const int32_t* positions, int64_t rows, int n_heads, int d,
                  int64_t row_stride, float base, cudaStream_t stream);
void rope_backward(bf16* dx, const int32_t* positions, int64_t rows, int n_heads, int d,
                   int64_t row_stride, float base, cudaStream_t stream);

// ---- causal flash attention (handwritten, tensor cores via WMMA), d = 64 or 128 -------------
// qkv: [B, N, Hq + 2*Hkv, d]; out: [B, N, Hq, d]; lse: [B, Hq, N] (fp32, natural log).
void attention_forward(bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv, int d,
                       cudaStream_t stream);
// dqkv (layout of qkv) is OVERWRITTEN. Deterministic: dK, dV by one block per key tile looping
// over the query tiles and the query heads of its group; dQ by a second pass, one block per query
// tile. Needs attention_backward_scratch_bytes() of scratch (D = rowsum(dout ∘ out)).
size_t attention_backward_scratch_bytes(int B, int N, int Hq);
void attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out,
                        const float* lse, int B, int N, int Hq, int Hkv, int d, void* scratch,
                        size_t scratch_bytes, cudaStream_t stream);

// ---- fused softmax + cross-entropy, one block per row (see cpu_ops.h) -------------------------
// logits: [rows, Vp] bf16, overwritten by the gradient when grad_scale != 0; losses: [rows] fp32.
void crossentropy_forward_backward(float* losses, bf16* logits, const int32_t* targets, int64_t rows,
                                   int V, int Vp, float grad_scale, cudaStream_t stream);

// ---- optimizer ----------------------------------------------------------------------------------
// AdamW on one flat range (the parameter arena or a slice of it), formula of cpu::adamw_update,
// on the fp32 master weights; param_bf16 (may be null) receives the rounded updated weights.
void adamw_update(float* master, bf16* param_bf16, const float* grad, float* m, float* v, int64_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int t, cudaStream_t stream);
void adamw_update(float* master, bf16* param_bf16, const bf16* grad, float* m, float* v, int64_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int t, cudaStream_t stream);

// ---- sum and sum of squares, on the device, deterministic ----------------------------------------
// *out (device, fp64) = sum x[i]^2. Two passes: kSumSquaresBlocks fixed blocks each reduce a
// strided slice in a fixed tree order into scratch (kSumSquaresBlocks doubles), then one block
// adds those in a fixed order. The result depends only on x and n, not on the GPU.
constexpr int kSumSquaresBlocks = 512;
void sum_squares(double* out, const float* x, int64_t n, double* scratch, cudaStream_t stream);
void sum_squares(double* out, const bf16* x, int64_t n, double* scratch, cudaStream_t stream);
// *out (device, fp64) = sum x[i], the same two passes and fixed order as sum_squares.
void sum(double* out, const float* x, int64_t n, double* scratch, cudaStream_t stream);

// ---- casts ----------------------------------------------------------------------------------------
void cast_f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream);  // round to nearest even
void cast_bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t stream);

// ---- Ulysses layout transforms (mirror of the cpu:: section of cpu_ops.h) -------------------
// dtype: DType::bf16 or DType::f32. heads and head_offsets are DEVICE arrays:
// heads[head_offsets[p] .. head_offsets[p+1]) are the head indices peer p takes (P+1 offsets).
// pack_heads:   src [B, T, Htot, d] -> P blocks one after another, block p = [B, T, n_p, d]
// pack_heads and unpack_heads move only the token rows b in [b_begin, b_end), t in
// [t_begin, t_end), to / from the places a whole call (0, B, 0, T) uses.
void ulysses_pack_heads(void* dst, const void* src, DType dtype, const int32_t* heads,
                        const int64_t* head_offsets, int P, int B, int T, int Htot, int d, int b_begin,
                        int b_end, int t_begin, int t_end, cudaStream_t stream);
// unpack_heads: the reverse, P blocks -> dst [B, T, Htot, d]. accumulate: dst += the blocks'
// values, peers added in increasing p (for bf16 each addition is rounded); otherwise assigned
// (each head listed once). Heads listed by no peer are left untouched.
void ulysses_unpack_heads(void* dst, const void* src, DType dtype, const int32_t* heads,
                          const int64_t* head_offsets, int P, int B, int T, int Htot, int d,
                          bool accumulate, int b_begin, int b_end, int t_begin, int t_end, cudaStream_t stream);
// pack_sequence:   src [B, P*T, h, d] -> P blocks, block s = [B, T, h, d], tokens [s*T, (s+1)*T)
void ulysses_pack_sequence(void* dst, const void* src, DType dtype, int P, int B, int T, int h,
                           int d, cudaStream_t stream);
// unpack_sequence: P blocks [B, T, h, d] (block s from peer s) -> dst [B, P*T, h, d]
void ulysses_unpack_sequence(void* dst, const void* src, DType dtype, int P, int B, int T, int h,
                             int d, cudaStream_t stream);

}  // namespace ulysses::cuda
