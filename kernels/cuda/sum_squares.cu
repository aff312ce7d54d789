// Sum and sum of squares on the device, deterministic: pass 1 launches exactly kSumSquaresBlocks
// blocks (independent of the GPU); block b takes the elements i = b*256 + t + k*kSumSquaresBlocks*256
// (thread t), sums x (or x^2) in fp64 per thread over its strided elements, and reduces its 256
// threads in a fixed tree order into scratch[b]. Pass 2: one block adds the partials in a fixed
// order into *out. No atomics; the same input gives the same bits on any GPU.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T, bool kSquare>
__global__ void sum_partial_kernel(double* partial, const T* x, int64_t n) {
  __shared__ double shared[32];
  double acc = 0.0;
  const int64_t stride = int64_t(kSumSquaresBlocks) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const double v = to_float(x[i]);
    acc += kSquare ? v * v : v;
  }
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void sum_finish_kernel(double* out, const double* partial) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < kSumSquaresBlocks; i += blockDim.x) acc += partial[i];
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = total;
}

template <typename T, bool kSquare>
void sum_impl(double* out, const T* x, int64_t n, double* scratch, cudaStream_t stream) {
  sum_partial_kernel<T, kSquare><<<kSumSquaresBlocks, kThreads, 0, stream>>>(scratch, x, n);
  CUDA_CHECK_LAUNCH("sum_partial_kernel");
  sum_finish_kernel<<<1, kThreads, 0, stream>>>(out, scratch);
  CUDA_CHECK_LAUNCH("sum_finish_kernel");
}

}  // namespace

void sum_squares(double* out, const float* x, int64_t n, double* scratch, cudaStream_t stream) {
  sum_impl<float, true>(out, x, n, scratch, stream);
}
void sum_squares(double* out, const bf16* x, int64_t n, double* scratch, cudaStream_t stream) {
  sum_impl<bf16, true>(out, x, n, scratch, stream);
}
void sum(double* out, const float* x, int64_t n, double* scratch, cudaStream_t stream) {
  sum_impl<float, false>(out, x, n, scratch, stream);
}

}  // namespace ulysses::cuda
