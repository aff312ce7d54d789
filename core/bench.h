// `ulysses bench`: times one training step of the configured model on synthetic tokens, split
// into forward, backward, gradient all-reduce and optimizer, with warm-up and repetitions, and
// prints tokens/s, achieved TFLOP/s and the all-to-all volume against its formula.
#pragma once
#include "comm/bootstrap.h"
#include "core/config.h"

namespace ulysses {

struct BenchOptions {
  int warmup = 2;
  int repeat = 5;
  std::string csv;  // append one row of results here (rank 0), for sweeps
};

int run_bench(const Config& cfg, MpiRuntime& mpi, const BenchOptions& opts);

}  // namespace ulysses
