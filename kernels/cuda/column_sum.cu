// Deterministic column sums of a [rows, C] bf16 matrix: the bias gradient of a matmul and the
// weight/bias gradients of layernorm. Stage 1: a grid of (C/32 column groups) x (kColumnChunks
// row chunks); each block of 32x8 threads sums its chunk's rows for 32 columns (thread (x, y)
// takes column x and rows y, y+8, ...), then the 8 row-phases are added in order into
// scratch[chunk][c]. Stage 2: one thread per column adds the kColumnChunks partials in order.
// The chunking depends only on rows, so results are identical on every GPU.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_internal.h"

namespace ulysses::cuda {
namespace {

constexpr int kCols = 32, kPhases = 8;

// partial_w, partial_b: [kColumnChunks, C]; partial_w unused when inp is null.
__global__ void column_partials_kernel(float* partial_w, float* partial_b, const bf16* dout,
                                       const bf16* inp, const float* mean, const float* rstd,
                                       int64_t rows, int C) {
  __shared__ float sw[kPhases][kCols + 1];
  __shared__ float sb[kPhases][kCols + 1];
  const int c = blockIdx.x * kCols + threadIdx.x;
  const int chunk = blockIdx.y;
  const int64_t rows_per_chunk = ceil_div(rows, kColumnChunks);
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = min(rows, r_begin + rows_per_chunk);
  float acc_w = 0.0f, acc_b = 0.0f;
  if (c < C) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kPhases) {
      const float g = __bfloat162float(dout[r * C + c]);
      acc_b += g;
      if (inp) acc_w += g * (__bfloat162float(inp[r * C + c]) - mean[r]) * rstd[r];
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float w = 0.0f, b = 0.0f;
    for (int y = 0; y < kPhases; ++y) {
      w += sw[y][threadIdx.x];
      b += sb[y][threadIdx.x];
    }
    partial_b[int64_t(chunk) * C + c] = b;
    if (inp) partial_w[int64_t(chunk) * C + c] = w;
  }
}

__global__ void column_finish_kernel(float* dweight, float* dbias, const float* partial_w,
                                     const float* partial_b, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  if (dbias) {
    float b = 0.0f;
    for (int k = 0; k < kColumnChunks; ++k) b += partial_b[int64_t(k) * C + c];
    dbias[c] += b;
  }
  if (dweight) {
    float w = 0.0f;
    for (int k = 0; k < kColumnChunks; ++k) w += partial_w[int64_t(k) * C + c];
    dweight[c] += w;
  }
}

}  // namespace

void column_sums(float* dweight, float* dbias, const bf16* dout, const bf16* inp, const float* mean,
                 const float* rstd, int64_t rows, int C, float* scratch, cudaStream_t stream) {
  if (C <= 0 || (!dweight && !dbias)) return;
  if (!inp) dweight = nullptr;
  float* partial_w = scratch;
  float* partial_b = scratch + int64_t(kColumnChunks) * C;
  const dim3 grid(unsigned(ceil_div(C, kCols)), kColumnChunks), block(kCols, kPhases);
  column_partials_kernel<<<grid, block, 0, stream>>>(partial_w, partial_b, dout, dweight ? inp : nullptr,
                                                     mean, rstd, rows, C);
  CUDA_CHECK_LAUNCH("column_partials_kernel");
  column_finish_kernel<<<grid_for(C, 256), 256, 0, stream>>>(dweight, dbias, partial_w, partial_b, C);
  CUDA_CHECK_LAUNCH("column_finish_kernel");
}

size_t bias_backward_scratch_bytes(int OC) { return sizeof(float) * 2 * kColumnChunks * size_t(OC); }

void bias_backward(float* dbias, const bf16* dout, int64_t M, int OC, void* scratch, cudaStream_t stream) {
  column_sums(nullptr, dbias, dout, nullptr, nullptr, nullptr, M, OC, static_cast<float*>(scratch), stream);
}

}  // namespace ulysses::cuda
