// Dense layer through the CPU BLAS (OpenBLAS sgemm), fp32 CPU reference.
//   forward:  out[M, OC] = inp[M, IC] · weight[OC, IC]^T + bias[OC]
//   backward: dinp[M, IC] += dout[M, OC] · weight[OC, IC]
//             dweight[OC, IC] += dout^T · inp;   dbias[OC] += sum_rows dout
//
// Threading: each product is cut into one block of output rows or columns per OpenMP thread
// (part() below) and every thread calls a one-thread sgemm on its block. OpenBLAS's own thread
// pool is switched off (blas_single_threaded): its workers spin after each call and, on a
// machine with as many cores as OpenMP threads, they competed with the OpenMP ops that follow
// (and the OpenMP threads' spin with the BLAS). Each output element is still summed over k by
// one sgemm in its own order, so a block boundary moves no element's rounding.
#include <algorithm>
#include <climits>

#include <cblas.h>
#include <omp.h>

#include "core/base/error.h"
#include "kernels/cpu/cpu_ops.h"

extern "C" void openblas_set_num_threads(int num_threads);

namespace ulysses::cpu {

namespace {

// OpenBLAS runs on the calling thread only (set once; the library's default is all cores).
void blas_single_threaded() {
  static const bool done = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)done;
}

// Thread t's block of a [rows, cols] output: a contiguous range of rows when there are at least
// as many rows as columns, else of columns, in multiples of 16 (the sgemm kernel's width).
struct Part {
  int64_t r0, r1;
  int c0, c1;
  bool empty() const { return r0 >= r1 || c0 >= c1; }
};

Part part(int64_t rows, int cols, int t, int threads) {
  if (rows >= cols) {
    const int64_t per = (rows + threads - 1) / threads;
    return {std::min(rows, t * per), std::min(rows, (t + 1) * per), 0, cols};
  }
  const int per = (cols / threads + 15) / 16 * 16;
  return {0, rows, std::min(cols, t * per), t + 1 == threads ? cols : std::min(cols, (t + 1) * per)};
}

// Products under this many multiply-adds run on one thread (thread start-up would dominate).
constexpr int64_t kParallelMacs = 1 << 18;

}  // namespace

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t M, int IC, int OC) {
  ULYSSES_ASSERT(M <= INT_MAX, "matmul_forward: M={} does not fit the BLAS int", M);
  if (M == 0) return;
  blas_single_threaded();
#pragma omp parallel if (M * IC * OC > kParallelMacs)
  {
    const Part p = part(M, OC, omp_get_thread_num(), omp_get_num_threads());
    if (!p.empty()) {
      float beta = 0.0f;
      if (bias) {
        for (int64_t r = p.r0; r < p.r1; r++)
          std::copy(bias + p.c0, bias + p.c1, out + r * OC + p.c0);
        beta = 1.0f;
      }
      // out[r0:r1, c0:c1] (+)= inp[r0:r1, :] · weight[c0:c1, :]^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(p.r1 - p.r0), p.c1 - p.c0, IC, 1.0f,
                  inp + p.r0 * IC, IC, weight + int64_t(p.c0) * IC, IC, beta, out + p.r0 * OC + p.c0,
                  OC);
    }
  }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t M, int IC, int OC) {
  ULYSSES_ASSERT(M <= INT_MAX, "matmul_backward: M={} does not fit the BLAS int", M);
  if (M == 0) return;
  blas_single_threaded();
  constexpr int kBlock = 64;  // dbias: output channels per task
  const int n_blocks = (OC + kBlock - 1) / kBlock;
#pragma omp parallel if (M * IC * OC > kParallelMacs)
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    if (dinp) {
      // dinp[r0:r1, c0:c1] += dout[r0:r1, :] · weight[:, c0:c1]
      const Part p = part(M, IC, t, threads);
      if (!p.empty())
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(p.r1 - p.r0), p.c1 - p.c0, OC,
                    1.0f, dout + p.r0 * OC, OC, weight + p.c0, IC, 1.0f, dinp + p.r0 * IC + p.c0, IC);
    }
    if (dweight) {
      // dweight[r0:r1, c0:c1] += dout[:, r0:r1]^T · inp[:, c0:c1]
      const Part p = part(OC, IC, t, threads);
      if (!p.empty())
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(p.r1 - p.r0), p.c1 - p.c0, int(M),
                    1.0f, dout + p.r0, OC, inp + p.c0, IC, 1.0f, dweight + p.r0 * IC + p.c0, IC);
    }
    if (dbias) {
      // A column reduction: each task owns a block of output channels and walks every row in
      // order (deterministic for any thread count).
#pragma omp for schedule(static)
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
}

}  // namespace ulysses::cpu
