// Casts between fp32 and bf16 (round to nearest even), 8 elements per thread.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void cast_f32_to_bf16_kernel(bf16* out, const float* in, int64_t n, bool vec) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  if (vec && i + 8 <= n) {
    const float4 lo = *reinterpret_cast<const float4*>(in + i);
    const float4 hi = *reinterpret_cast<const float4*>(in + i + 4);
    const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    Pack8 y;
    for (int k = 0; k < 8; ++k) y.v[k] = __float2bfloat16(x[k]);
    store_pack8(out + i, y);
  } else {
    for (int64_t j = i; j < n && j < i + 8; ++j) out[j] = __float2bfloat16(in[j]);
  }
}

__global__ void cast_bf16_to_f32_kernel(float* out, const bf16* in, int64_t n, bool vec) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  if (vec && i + 8 <= n) {
    const Pack8 x = load_pack8(in + i);
    float4 lo, hi;
    lo.x = __bfloat162float(x.v[0]); lo.y = __bfloat162float(x.v[1]);
    lo.z = __bfloat162float(x.v[2]); lo.w = __bfloat162float(x.v[3]);
    hi.x = __bfloat162float(x.v[4]); hi.y = __bfloat162float(x.v[5]);
    hi.z = __bfloat162float(x.v[6]); hi.w = __bfloat162float(x.v[7]);
    *reinterpret_cast<float4*>(out + i) = lo;
    *reinterpret_cast<float4*>(out + i + 4) = hi;
  } else {
    for (int64_t j = i; j < n && j < i + 8; ++j) out[j] = __bfloat162float(in[j]);
  }
}

}  // namespace

void cast_f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = is_aligned16(out) && is_aligned16(in);
  cast_f32_to_bf16_kernel<<<grid_for(n, kThreads * 8), kThreads, 0, stream>>>(out, in, n, vec);
  CUDA_CHECK_LAUNCH("cast_f32_to_bf16_kernel");
}

void cast_bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = is_aligned16(out) && is_aligned16(in);
  cast_bf16_to_f32_kernel<<<grid_for(n, kThreads * 8), kThreads, 0, stream>>>(out, in, n, vec);
  CUDA_CHECK_LAUNCH("cast_bf16_to_f32_kernel");
}

}  // namespace ulysses::cuda
