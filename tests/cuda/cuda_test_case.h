// What the table-driven CUDA tests share (tests/cuda/test_*.cpp run under the MPI-aware
// tests/test_main.cpp): the SKIPPED exit without a device, and one checked result row.
#pragma once
#include <cuda_runtime.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace ulysses::cuda::test {

// No CUDA device: print SKIPPED and exit 77 (CTest's SKIP_RETURN_CODE), finalising MPI first.
inline void skip_without_cuda() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    std::fflush(stdout);
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
    std::exit(77);
  }
}

// One compared output: its name, the normalised error (cuda_test_util.h) and the bound.
struct Result {
  std::string output;
  double err;
  double tol;
};
using Results = std::vector<Result>;

}  // namespace ulysses::cuda::test
