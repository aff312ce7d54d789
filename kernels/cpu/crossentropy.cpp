// Fused softmax + cross-entropy over a chunk of rows, fp32 CPU reference, in place.
// logits: [rows, Vp], only the first V columns are real. For a row with target y >= 0:
//   loss = log sum_v exp(x_v) - x_y
//   grad = (softmax(x) - onehot(y)) * grad_scale   written over the logits; padding gets 0.
// A row with y < 0 is ignored: loss 0 and a zero gradient row.
// grad_scale == 0 computes the losses only and leaves the logits untouched (validation).
// Per row: the max, exp(x - max) written in place (or into a small scratch without gradient),
// its sum in double, then the scaling; each logit is exponentiated once. OpenMP over rows.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/vec_math.h"

namespace ulysses::cpu {

void crossentropy_forward_backward(float* losses, float* logits, const int32_t* targets,
                                   int64_t rows, int V, int Vp, float grad_scale) {
  const bool with_grad = grad_scale != 0.0f;
  constexpr int kChunk = 1024;  // scratch for the exponentials when the logits stay untouched
#pragma omp parallel for schedule(static) if (rows * int64_t(V) > 65536)
  for (int64_t r = 0; r < rows; r++) {
    float* x = logits + r * Vp;
    const int32_t y = targets[r];
    if (y < 0) {
      losses[r] = 0.0f;
      if (with_grad) std::fill(x, x + Vp, 0.0f);
      continue;
    }
    const float x_max = max_of(x, V);
    const float x_y = x[y];
    double sum = 0.0;
    if (with_grad) {
      for (int v = 0; v < V; v++) x[v] = exp_approx(x[v] - x_max);
      sum = sum_of(x, V);
    } else {
      float e[kChunk];
      for (int v0 = 0; v0 < V; v0 += kChunk) {
        const int n = std::min(kChunk, V - v0);
        for (int v = 0; v < n; v++) e[v] = exp_approx(x[v0 + v] - x_max);
        sum += sum_of(e, n);
      }
    }
    losses[r] = float(std::log(sum) + x_max - x_y);
    if (with_grad) {
      const float s = float(grad_scale / sum);
      for (int v = 0; v < V; v++) x[v] *= s;
      x[y] -= grad_scale;
      std::fill(x + V, x + Vp, 0.0f);
    }
  }
}

}  // namespace ulysses::cpu
