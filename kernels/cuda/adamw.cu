// AdamW on one flat range of parameters (formula of cpu::adamw_update): fp32 master weights and
// moments, a bf16 or fp32 gradient, and the rounded bf16 copy of the updated weights written in
// the same pass. Bias corrections formed in double on the host once per call. One thread per
// element, grid-stride loop; deterministic (no reductions).
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(bf16 x) { return __bfloat162float(x); }

template <typename G>
__global__ void adamw_kernel(float* master, bf16* param_bf16, const G* grad, float* m, float* v, int64_t n,
                             float lr, float beta1, float beta2, float eps, float weight_decay,
                             float grad_scale, float inv_bc1, float inv_bc2) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = to_float(grad[i]) * grad_scale;
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
    const float p = master[i] - lr * (update + weight_decay * master[i]);
    master[i] = p;
    if (param_bf16) param_bf16[i] = __float2bfloat16(p);
  }
}

template <typename G>
void adamw(float* master, bf16* param_bf16, const G* grad, float* m, float* v, int64_t n, float lr,
           float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t,
           cudaStream_t stream) {
  if (n <= 0) return;
  const float inv_bc1 = float(1.0 / (1.0 - std::pow(double(beta1), t)));
  const float inv_bc2 = float(1.0 / (1.0 - std::pow(double(beta2), t)));
  const int64_t blocks = ceil_div(n, 256);
  const unsigned grid = unsigned(blocks < 65536 ? blocks : 65536);
  adamw_kernel<G><<<grid, 256, 0, stream>>>(master, param_bf16, grad, m, v, n, lr, beta1, beta2, eps,
                                            weight_decay, grad_scale, inv_bc1, inv_bc2);
  CUDA_CHECK_LAUNCH("adamw_kernel");
}

}  // namespace

void adamw_update(float* master, bf16* param_bf16, const float* grad, float* m, float* v, int64_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int t, cudaStream_t stream) {
  adamw(master, param_bf16, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, grad_scale, t, stream);
}

void adamw_update(float* master, bf16* param_bf16, const bf16* grad, float* m, float* v, int64_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, int t, cudaStream_t stream) {
  adamw(master, param_bf16, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, grad_scale, t, stream);
}

}  // namespace ulysses::cuda
