// GELU (tanh approximation) forward and backward, elementwise on bf16, fp32 math.
// Each thread handles 8 consecutive elements: one 16-byte load per operand when the pointers
// are aligned, a scalar loop otherwise and for the tail.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void gelu_forward_kernel(bf16* out, const bf16* inp, int64_t n, bool vec) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  if (vec && i + 8 <= n) {
    const Pack8 x = load_pack8(inp + i);
    Pack8 y;
    for (int k = 0; k < 8; ++k) y.v[k] = __float2bfloat16(gelu_value(__bfloat162float(x.v[k])));
    store_pack8(out + i, y);
  } else {
    for (int64_t j = i; j < n && j < i + 8; ++j)
      out[j] = __float2bfloat16(gelu_value(__bfloat162float(inp[j])));
  }
}

// dinp += gelu'(inp) * dout
__global__ void gelu_backward_kernel(bf16* dinp, const bf16* inp, const bf16* dout, int64_t n, bool vec) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  if (vec && i + 8 <= n) {
    const Pack8 x = load_pack8(inp + i), g = load_pack8(dout + i);
    Pack8 d = load_pack8(dinp + i);
    for (int k = 0; k < 8; ++k) {
      const float dx = gelu_derivative(__bfloat162float(x.v[k])) * __bfloat162float(g.v[k]);
      d.v[k] = __float2bfloat16(__bfloat162float(d.v[k]) + dx);
    }
    store_pack8(dinp + i, d);
  } else {
    for (int64_t j = i; j < n && j < i + 8; ++j) {
      const float dx = gelu_derivative(__bfloat162float(inp[j])) * __bfloat162float(dout[j]);
      dinp[j] = __float2bfloat16(__bfloat162float(dinp[j]) + dx);
    }
  }
}

}  // namespace

void gelu_forward(bf16* out, const bf16* inp, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = is_aligned16(out) && is_aligned16(inp);
  gelu_forward_kernel<<<grid_for(n, kThreads * 8), kThreads, 0, stream>>>(out, inp, n, vec);
  CUDA_CHECK_LAUNCH("gelu_forward_kernel");
}

void gelu_backward(bf16* dinp, const bf16* inp, const bf16* dout, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = is_aligned16(dinp) && is_aligned16(inp) && is_aligned16(dout);
  gelu_backward_kernel<<<grid_for(n, kThreads * 8), kThreads, 0, stream>>>(dinp, inp, dout, n, vec);
  CUDA_CHECK_LAUNCH("gelu_backward_kernel");
}

}  // namespace ulysses::cuda
