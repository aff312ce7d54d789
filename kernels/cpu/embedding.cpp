// Token + position embedding, fp32 CPU reference.
//   forward:  out[r, :] = wte[tokens[r], :] + wpe[positions[r], :]      out: [rows, C]
//   backward: dwte[tokens[r], :] += dout[r, :]; dwpe[positions[r], :] += dout[r, :]
// The backward scatters into shared rows (a token can repeat), so it is parallelised over
// channel blocks: each thread owns a slice of every row and walks the rows in order, which is
// race-free and gives the same sums for any thread count.
#include <algorithm>

#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

void embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                       const float* wte, const float* wpe, int64_t rows, int C) {
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t r = 0; r < rows; r++) {
    float* o = out + r * C;
    const float* w = wte + int64_t(tokens[r]) * C;
    if (wpe) {
      const float* p = wpe + int64_t(positions[r]) * C;
      for (int c = 0; c < C; c++) o[c] = w[c] + p[c];
    } else {
      for (int c = 0; c < C; c++) o[c] = w[c];
    }
  }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        const int32_t* positions, int64_t rows, int C) {
  constexpr int kBlock = 64;  // channels per task: 256 bytes of each row
  const int n_blocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int blk = 0; blk < n_blocks; blk++) {
    const int c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    for (int64_t r = 0; r < rows; r++) {
      const float* g = dout + r * C;
      float* w = dwte + int64_t(tokens[r]) * C;
      for (int c = c0; c < c1; c++) w[c] += g[c];
      if (dwpe) {
        float* p = dwpe + int64_t(positions[r]) * C;
        for (int c = c0; c < c1; c++) p[c] += g[c];
      }
    }
  }
}

}  // namespace ulysses::cpu
