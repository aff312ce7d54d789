// LayerNorm over the last dimension (eps 1e-5, biased variance), fp32 CPU reference.
//   forward:  mean[r], rstd[r] = 1/sqrt(var[r] + eps);  out[r, c] = n[r, c] * w[c] + b[c]
//             with n = (inp - mean) * rstd                         inp, out: [rows, C]
//   backward: dn = dout * w;  dinp += rstd * (dn - mean_c(dn) - n * mean_c(dn * n))
//             dweight += sum_r dout * n;  dbias += sum_r dout
// Row statistics are accumulated in double (cheap, and it keeps the reference honest).
// The parameter gradients are reductions over rows; they are parallelised over channel blocks
// (each thread owns a slice of channels and walks every row in order), so the result is the
// same for any thread count.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

namespace {
constexpr float kEps = 1e-5f;
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                       const float* weight, const float* bias, int64_t rows, int C) {
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t r = 0; r < rows; r++) {
    const float* x = inp + r * C;
    double s = 0.0;
    for (int c = 0; c < C; c++) s += x[c];
    const float m = float(s / C);
    double v = 0.0;
    for (int c = 0; c < C; c++) {
      const float dx = x[c] - m;
      v += double(dx) * dx;
    }
    const float rs = float(1.0 / std::sqrt(v / C + kEps));
    float* o = out + r * C;
    for (int c = 0; c < C; c++) o[c] = (x[c] - m) * rs * weight[c] + bias[c];
    mean[r] = m;
    rstd[r] = rs;
  }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean,
                        const float* rstd, int64_t rows, int C) {
  const bool parallel = rows * C > 32768;
  // dinp: independent rows.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; r++) {
    const float* x = inp + r * C;
    const float* g = dout + r * C;
    const float m = mean[r], rs = rstd[r];
    float dn_mean = 0.0f, dn_n_mean = 0.0f;
    for (int c = 0; c < C; c++) {
      const float n = (x[c] - m) * rs;
      const float dn = g[c] * weight[c];
      dn_mean += dn;
      dn_n_mean += dn * n;
    }
    dn_mean /= C;
    dn_n_mean /= C;
    float* dx = dinp + r * C;
    for (int c = 0; c < C; c++) {
      const float n = (x[c] - m) * rs;
      const float dn = g[c] * weight[c];
      dx[c] += rs * (dn - dn_mean - n * dn_n_mean);
    }
  }
  // dweight, dbias: reductions over rows, one channel block per task.
  constexpr int kBlock = 64;
  const int n_blocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (parallel)
  for (int blk = 0; blk < n_blocks; blk++) {
    const int c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    float dw[kBlock] = {}, db[kBlock] = {};
    for (int64_t r = 0; r < rows; r++) {
      const float* x = inp + r * C + c0;
      const float* g = dout + r * C + c0;
      const float m = mean[r], rs = rstd[r];
      for (int c = 0; c < c1 - c0; c++) {
        dw[c] += g[c] * ((x[c] - m) * rs);
        db[c] += g[c];
      }
    }
    for (int c = c0; c < c1; c++) {
      dweight[c] += dw[c - c0];
      dbias[c] += db[c - c0];
    }
  }
}

}  // namespace ulysses::cpu
