// Rotary position embedding (rotate-half), in place on bf16, forward and backward (rotation by
// -theta). One thread per (row, i < d/2): it forms theta = p * base^(-2i/d) in fp64 (reduced mod
// 2*pi, so positions near 10^6 keep their phase), takes the fp32 sin/cos once, and rotates the
// pair (x[i], x[i + d/2]) of every head of the row.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

__global__ void rope_kernel(bf16* x, const int32_t* positions, int64_t rows, int n_heads, int d,
                            int64_t row_stride, float base, float sign) {
  const int half = d / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * half) return;
  const int64_t r = idx / half;
  const int i = int(idx % half);
  const double inv_freq = pow(double(base), -2.0 * i / d);
  const double theta = fmod(double(positions[r]) * inv_freq, 6.283185307179586476925);
  float sn, cs;
  sincosf(float(theta), &sn, &cs);
  sn *= sign;
  bf16* row = x + r * row_stride;
  for (int h = 0; h < n_heads; ++h) {
    bf16* lo = row + int64_t(h) * d + i;
    bf16* hi = lo + half;
    const float a = __bfloat162float(*lo), b = __bfloat162float(*hi);
    *lo = __float2bfloat16(a * cs - b * sn);
    *hi = __float2bfloat16(a * sn + b * cs);
  }
}

void rope(bf16* x, const int32_t* positions, int64_t rows, int n_heads, int d, int64_t row_stride,
          float base, float sign, cudaStream_t stream) {
  if (rows <= 0 || n_heads <= 0) return;
  if (d % 2 != 0) cuda_check_fail(__FILE__, __LINE__, "rope", "head dimension must be even");
  rope_kernel<<<grid_for(rows * (d / 2), 256), 256, 0, stream>>>(x, positions, rows, n_heads, d, row_stride,
                                                                 base, sign);
  CUDA_CHECK_LAUNCH("rope_kernel");
}

}  // namespace

void rope_forward(bf16* x, const int32_t* positions, int64_t rows, int n_heads, int d,
                  int64_t row_stride, float base, cudaStream_t stream) {
  rope(x, positions, rows, n_heads, d, row_stride, base, 1.0f, stream);
}

void rope_backward(bf16* dx, const int32_t* positions, int64_t rows, int n_heads, int d,
                   int64_t row_stride, float base, cudaStream_t stream) {
  rope(dx, positions, rows, n_heads, d, row_stride, base, -1.0f, stream);
}

}  // namespace ulysses::cuda
