// LayerNorm forward (optionally fused with the residual add before it) and backward, bf16 in and
// out, fp32 statistics. One warp per row: lane l takes the chunks of W elements starting at
// (l + 32k)*W, W = 8 (16-byte loads) when C % 8 == 0 and the pointers are aligned, else 1.
// Forward makes two passes for the statistics (mean, then the variance around it: no
// cancellation) and one to write. Backward: the same warp-per-row scheme for dinp; dweight and
// dbias through the deterministic column sums of column_sum.cu.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_internal.h"

#include <initializer_list>

namespace ulysses::cuda {
namespace {

constexpr int kWarps = 8;  // rows per block
constexpr float kEps = 1e-5f;

template <int W>
__device__ inline void load_w(float (&x)[8], const bf16* p) {
  if constexpr (W == 8) {
    const Pack8 v = load_pack8(p);
    for (int k = 0; k < 8; ++k) x[k] = __bfloat162float(v.v[k]);
  } else {
    x[0] = __bfloat162float(p[0]);
  }
}
template <int W>
__device__ inline void store_w(bf16* p, const float (&x)[8]) {
  if constexpr (W == 8) {
    Pack8 v;
    for (int k = 0; k < 8; ++k) v.v[k] = __float2bfloat16(x[k]);
    store_pack8(p, v);
  } else {
    p[0] = __float2bfloat16(x[0]);
  }
}

// residual_out / a / b used only when Fused: then inp is residual_out, written in pass 1 by the
// same lane that reads it back in passes 2 and 3.
template <int W, bool Fused>
__global__ void layernorm_forward_kernel(bf16* out, float* mean_out, float* rstd_out, const bf16* inp,
                                         bf16* residual_out, const bf16* a, const bf16* b,
                                         const bf16* weight, const bf16* bias, int64_t rows, int C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together; no block-level sync below
  const int64_t base = row * C;
  const bf16* x = Fused ? residual_out + base : inp + base;
  float v[8];

  float sum = 0.0f;
  for (int c = lane * W; c < C; c += 32 * W) {
    if constexpr (Fused) {
      float va[8], vb[8];
      load_w<W>(va, a + base + c);
      load_w<W>(vb, b + base + c);
      for (int k = 0; k < W; ++k) v[k] = __bfloat162float(__float2bfloat16(va[k] + vb[k]));
      store_w<W>(residual_out + base + c, v);
    } else {
      load_w<W>(v, x + c);
    }
    for (int k = 0; k < W; ++k) sum += v[k];
  }
  const float mean = warp_sum(sum) / C;

  float sq = 0.0f;
  for (int c = lane * W; c < C; c += 32 * W) {
    load_w<W>(v, x + c);
    for (int k = 0; k < W; ++k) sq += (v[k] - mean) * (v[k] - mean);
  }
  const float rstd = rsqrtf(warp_sum(sq) / C + kEps);

  for (int c = lane * W; c < C; c += 32 * W) {
    float w[8], bb[8];
    load_w<W>(v, x + c);
    load_w<W>(w, weight + c);
    load_w<W>(bb, bias + c);
    for (int k = 0; k < W; ++k) v[k] = (v[k] - mean) * rstd * w[k] + bb[k];
    store_w<W>(out + base + c, v);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = weight * dout
template <int W>
__global__ void layernorm_backward_dinp_kernel(bf16* dinp, const bf16* dout, const bf16* inp,
                                               const bf16* weight, const float* mean,
                                               const float* rstd, int64_t rows, int C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t base = row * C;
  const float mu = mean[row], rs = rstd[row];
  float x[8], g[8], w[8];

  float s_dnorm = 0.0f, s_dnorm_xhat = 0.0f;
  for (int c = lane * W; c < C; c += 32 * W) {
    load_w<W>(x, inp + base + c);
    load_w<W>(g, dout + base + c);
    load_w<W>(w, weight + c);
    for (int k = 0; k < W; ++k) {
      const float dnorm = w[k] * g[k];
      s_dnorm += dnorm;
      s_dnorm_xhat += dnorm * (x[k] - mu) * rs;
    }
  }
  const float m_dnorm = warp_sum(s_dnorm) / C;
  const float m_dnorm_xhat = warp_sum(s_dnorm_xhat) / C;

  for (int c = lane * W; c < C; c += 32 * W) {
    float d[8];
    load_w<W>(x, inp + base + c);
    load_w<W>(g, dout + base + c);
    load_w<W>(w, weight + c);
    load_w<W>(d, dinp + base + c);
    for (int k = 0; k < W; ++k) {
      const float xhat = (x[k] - mu) * rs;
      d[k] += (w[k] * g[k] - m_dnorm - xhat * m_dnorm_xhat) * rs;
    }
    store_w<W>(dinp + base + c, d);
  }
}

bool vectorisable(int C, std::initializer_list<const void*> ptrs) {
  if (C % 8 != 0) return false;
  for (const void* p : ptrs)
    if (p && !is_aligned16(p)) return false;
  return true;
}

}  // namespace

void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight,
                       const bf16* bias, int64_t rows, int C, cudaStream_t stream) {
  if (rows <= 0) return;
  const unsigned grid = grid_for(rows, kWarps);
  if (vectorisable(C, {out, inp, weight, bias}))
    layernorm_forward_kernel<8, false><<<grid, kWarps * 32, 0, stream>>>(
        out, mean, rstd, inp, nullptr, nullptr, nullptr, weight, bias, rows, C);
  else
    layernorm_forward_kernel<1, false><<<grid, kWarps * 32, 0, stream>>>(
        out, mean, rstd, inp, nullptr, nullptr, nullptr, weight, bias, rows, C);
  CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
}

void fused_residual_layernorm_forward(bf16* residual_out, bf16* out, float* mean, float* rstd,
                                      const bf16* a, const bf16* b, const bf16* weight,
                                      const bf16* bias, int64_t rows, int C, cudaStream_t stream) {
  if (rows <= 0) return;
  const unsigned grid = grid_for(rows, kWarps);
  if (vectorisable(C, {residual_out, out, a, b, weight, bias}))
    layernorm_forward_kernel<8, true><<<grid, kWarps * 32, 0, stream>>>(
        out, mean, rstd, nullptr, residual_out, a, b, weight, bias, rows, C);
  else
    layernorm_forward_kernel<1, true><<<grid, kWarps * 32, 0, stream>>>(
        out, mean, rstd, nullptr, residual_out, a, b, weight, bias, rows, C);
  CUDA_CHECK_LAUNCH("layernorm_forward_kernel (fused residual)");
}

size_t layernorm_backward_scratch_bytes(int C) { return sizeof(float) * 2 * kColumnChunks * size_t(C); }

void layernorm_backward(bf16* dinp, float* dweight, float* dbias, const bf16* dout, const bf16* inp,
                        const bf16* weight, const float* mean, const float* rstd, int64_t rows,
                        int C, void* scratch, cudaStream_t stream) {
  if (rows <= 0) return;
  if (dinp) {
    const unsigned grid = grid_for(rows, kWarps);
    if (vectorisable(C, {dinp, dout, inp, weight}))
      layernorm_backward_dinp_kernel<8><<<grid, kWarps * 32, 0, stream>>>(dinp, dout, inp, weight, mean,
                                                                          rstd, rows, C);
    else
      layernorm_backward_dinp_kernel<1><<<grid, kWarps * 32, 0, stream>>>(dinp, dout, inp, weight, mean,
                                                                          rstd, rows, C);
    CUDA_CHECK_LAUNCH("layernorm_backward_dinp_kernel");
  }
  column_sums(dweight, dbias, dout, inp, mean, rstd, rows, C, static_cast<float*>(scratch), stream);
}

}  // namespace ulysses::cuda
