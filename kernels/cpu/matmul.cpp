// Dense layer through the CPU BLAS (OpenBLAS sgemm), fp32 CPU reference.
//   forward:  out[M, OC] = inp[M, IC] · weight[OC, IC]^T + bias[OC]
//   backward: dinp[M, IC] += dout[M, OC] · weight[OC, IC]
//             dweight[OC, IC] += dout^T · inp;   dbias[OC] += sum_rows dout
// The BLAS is called outside any OpenMP region (it runs its own threads).
#include <algorithm>
#include <climits>

#include <cblas.h>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t M, int IC, int OC) {
  ULYSSES_ASSERT(M <= INT_MAX, "matmul_forward: M={} does not fit the BLAS int", M);
  if (M == 0) return;
  float beta = 0.0f;
  if (bias) {
#pragma omp parallel for schedule(static) if (M * OC > 32768)
    for (int64_t r = 0; r < M; r++) std::copy(bias, bias + OC, out + r * OC);
    beta = 1.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), OC, IC, 1.0f, inp, IC, weight, IC,
              beta, out, OC);
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t M, int IC, int OC) {
  ULYSSES_ASSERT(M <= INT_MAX, "matmul_backward: M={} does not fit the BLAS int", M);
  if (M == 0) return;
  if (dinp)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), IC, OC, 1.0f, dout, OC, weight,
                IC, 1.0f, dinp, IC);
  if (dweight)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, int(M), 1.0f, dout, OC, inp, IC,
                1.0f, dweight, IC);
  if (dbias) {
    // A column reduction: each task owns a block of output channels and walks every row in
    // order (deterministic for any thread count).
    constexpr int kBlock = 64;
    const int n_blocks = (OC + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (M * OC > 32768)
    for (int blk = 0; blk < n_blocks; blk++) {
      const int c0 = blk * kBlock, c1 = std::min(OC, c0 + kBlock);
      float acc[kBlock] = {};
      for (int64_t r = 0; r < M; r++) {
        const float* g = dout + r * OC + c0;
        for (int c = 0; c < c1 - c0; c++) acc[c] += g[c];
      }
      for (int c = c0; c < c1; c++) dbias[c] += acc[c - c0];
    }
  }
}

}  // namespace ulysses::cpu
