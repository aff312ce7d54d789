// Residual add out = a + b on bf16 (fp32 sum, one rounding); out may alias a or b since each
// element is read before it is written by the same thread.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void residual_forward_kernel(bf16* out, const bf16* a, const bf16* b, int64_t n, bool vec) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  if (vec && i + 8 <= n) {
    const Pack8 x = load_pack8(a + i), y = load_pack8(b + i);
    Pack8 z;
    for (int k = 0; k < 8; ++k) z.v[k] = __float2bfloat16(__bfloat162float(x.v[k]) + __bfloat162float(y.v[k]));
    store_pack8(out + i, z);
  } else {
    for (int64_t j = i; j < n && j < i + 8; ++j)
      out[j] = __float2bfloat16(__bfloat162float(a[j]) + __bfloat162float(b[j]));
  }
}

}  // namespace

void residual_forward(bf16* out, const bf16* a, const bf16* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = is_aligned16(out) && is_aligned16(a) && is_aligned16(b);
  residual_forward_kernel<<<grid_for(n, kThreads * 8), kThreads, 0, stream>>>(out, a, b, n, vec);
  CUDA_CHECK_LAUNCH("residual_forward_kernel");
}

}  // namespace ulysses::cuda
