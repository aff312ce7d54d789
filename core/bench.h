// `ulysses bench`: times one training step of the configured model on synthetic tokens, split
// into forward, backward, gradient all-reduce and optimizer, with warm-up and repetitions, and
// prints tokens/s, achieved TFLOP/s (and on a GPU the MFU) and the all-to-all volume against its
// formula. On cuda every timed phase ends with ops::synchronize, so the times are device times.
#pragma once
#include <string>

#include "comm/bootstrap.h"
#include "core/config.h"

namespace ulysses {

struct BenchOptions {
  int warmup = 2;
  int repeat = 5;
  std::string csv;  // append one row of results here (rank 0), for sweeps
};

int run_bench(const Config& cfg, MpiRuntime& mpi, const BenchOptions& opts);

// Dense bf16 tensor-core peak in TFLOP/s (without sparsity) of a GPU, from its CUDA device name,
// for MFU = achieved / peak. From NVIDIA's published datasheets: H100 SXM5 989.4, H100 PCIe 756.5,
// H200 SXM 989.4 (the H100 SXM's tensor cores), A100 (SXM and PCIe) 312. Names as
// cudaGetDeviceProperties reports them, e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
// "NVIDIA H200", "NVIDIA A100-SXM4-80GB". 0 for any other GPU, the NVL boards included (the
// bench prints MFU n/a).
double peak_bf16_tflops(const std::string& device_name);

}  // namespace ulysses
