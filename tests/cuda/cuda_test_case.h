// What the table-driven CUDA tests share (tests/cuda/test_*.cpp run under the MPI-aware
// tests/test_main.cpp): the SKIPPED exit without a device, and one checked result row.
#pragma once
#include <catch2/catch.hpp>
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

// One line per result ("ok" / "FAIL", the case, the output, error and bound) and a Catch check
// each; NaN and inf errors fail (they compare false). Returns the number of failures.
inline int check_results(const std::string& case_name, const Results& results) {
  int failures = 0;
  for (const Result& r : results) {
    const bool ok = r.err <= r.tol;
    failures += !ok;
    std::printf("%s  %-44s %-28s err %.3e  tol %.0e\n", ok ? "ok  " : "FAIL", case_name.c_str(), r.output.c_str(),
                r.err, r.tol);
    INFO(case_name << ": " << r.output << " err " << r.err << " tol " << r.tol);
    CHECK(ok);
  }
  return failures;
}

}  // namespace ulysses::cuda::test
