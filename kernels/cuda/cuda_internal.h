// Launchers shared between the CUDA op files (not part of the op interface in cuda_ops.h).
#pragma once
#include "kernels/cuda/cuda_ops.h"

namespace ulysses::cuda {

// Column sums over rows of a [rows, C] bf16 matrix, deterministic (kColumnChunks fixed row
// chunks, partials in scratch [2][kColumnChunks][C] floats, then summed in chunk order):
//   dbias[c]   += sum_r dout[r, c]                                      (dbias may be null)
//   dweight[c] += sum_r dout[r, c] * (inp[r, c] - mean[r]) * rstd[r]    (only when inp != null)
void column_sums(float* dweight, float* dbias, const bf16* dout, const bf16* inp, const float* mean,
                 const float* rstd, int64_t rows, int C, float* scratch, cudaStream_t stream);

}  // namespace ulysses::cuda
