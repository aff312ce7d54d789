// Fused softmax + cross-entropy + its gradient, one block per row, in place on bf16 logits.
// logits: [rows, Vp], the first V columns real. Pass 1: each thread keeps an online (max, sum of
// exp) over its columns; the block combines them (block max, then the rescaled sums, fixed
// order). loss = log(sum) + max - x[target]. Pass 2 (grad_scale != 0): the row becomes
// (softmax - onehot(target)) * grad_scale, padding columns 0. Rows with target < 0: loss 0 and a
// zero gradient row. Threads take 8 consecutive columns (16-byte loads) when Vp % 8 == 0.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

constexpr int kThreads = 512;

template <int W>
__global__ void crossentropy_kernel(float* losses, bf16* logits, const int32_t* targets, int V, int Vp,
                                    float grad_scale) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x;
  bf16* x = logits + r * Vp;
  const int32_t y = targets[r];
  const bool with_grad = grad_scale != 0.0f;
  if (y < 0) {  // the whole block takes this branch: no barrier is skipped by part of it
    if (threadIdx.x == 0) losses[r] = 0.0f;
    if (with_grad)
      for (int c = threadIdx.x; c < Vp; c += blockDim.x) x[c] = __float2bfloat16(0.0f);
    return;
  }
  const float x_y = __bfloat162float(x[y]);  // read before anybody overwrites it (barriers below)

  float m = -INFINITY, s = 0.0f;
  for (int c = threadIdx.x * W; c < V; c += blockDim.x * W) {
    float v[8];
    if constexpr (W == 8) {
      const Pack8 p = load_pack8(x + c);
      for (int k = 0; k < 8; ++k) v[k] = c + k < V ? __bfloat162float(p.v[k]) : -INFINITY;
    } else {
      v[0] = __bfloat162float(x[c]);
    }
    for (int k = 0; k < W; ++k) {
      if (v[k] > m) {
        s = s * expf(m - v[k]) + 1.0f;
        m = v[k];
      } else {
        s += expf(v[k] - m);
      }
    }
  }
  const float row_max = block_max(m, shared);
  const float sum = block_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max), shared);
  if (threadIdx.x == 0) losses[r] = logf(sum) + row_max - x_y;
  if (!with_grad) return;

  const float scale = grad_scale / sum;
  for (int c = threadIdx.x * W; c < Vp; c += blockDim.x * W) {
    if constexpr (W == 8) {
      Pack8 p = load_pack8(x + c);
      for (int k = 0; k < 8; ++k) {
        const int col = c + k;
        float g = 0.0f;
        if (col < V) g = expf(__bfloat162float(p.v[k]) - row_max) * scale - (col == y ? grad_scale : 0.0f);
        p.v[k] = __float2bfloat16(g);
      }
      store_pack8(x + c, p);
    } else {
      float g = 0.0f;
      if (c < V) g = expf(__bfloat162float(x[c]) - row_max) * scale - (c == y ? grad_scale : 0.0f);
      x[c] = __float2bfloat16(g);
    }
  }
}

}  // namespace

void crossentropy_forward_backward(float* losses, bf16* logits, const int32_t* targets, int64_t rows,
                                   int V, int Vp, float grad_scale, cudaStream_t stream) {
  if (rows <= 0) return;
  if (Vp % 8 == 0 && is_aligned16(logits))
    crossentropy_kernel<8><<<unsigned(rows), kThreads, 0, stream>>>(losses, logits, targets, V, Vp, grad_scale);
  else
    crossentropy_kernel<1><<<unsigned(rows), kThreads, 0, stream>>>(losses, logits, targets, V, Vp, grad_scale);
  CUDA_CHECK_LAUNCH("crossentropy_kernel");
}

}  // namespace ulysses::cuda
