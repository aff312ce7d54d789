// `ulysses estimate`: the memory one rank needs for a config, item by item, for the CPU fp32
// layout and for the CUDA layout (bf16 compute copy of the parameters and bf16 activations; fp32
// master weights, gradients and AdamW m, v), both as the model allocates them, and the longest
// sequence that fits a memory budget for each recompute / ZeRO choice. Activation sizes come from GPT::activation_layout, the function the
// model allocates its arena with, so the estimate cannot drift from the code.
#pragma once
#include <string>
#include <vector>

#include "comm/bootstrap.h"
#include "core/config.h"
#include "core/gpt.h"

namespace ulysses {

struct EstimateOptions {
  int gpus = 0;                         // world size; 0: parallel.sequence (or emulate_sequence)
  std::string gpu_memory = "80GB";      // budget per rank for the longest-sequence search
};

enum class MemoryLayout { cpu_fp32, cuda_bf16 };

struct MemoryItem {
  std::string name;  // parameters, gradients, optimizer state, activations per layer (x L), ...
  double bytes = 0;
};

struct MemoryEstimate {
  std::vector<MemoryItem> items;
  // runtime.offload = checkpoints (CUDA layout): the pinned host memory the offloaded layer
  // outputs live in; not part of total(), which is the memory of the device (or the CPU process)
  double host_pinned_bytes = 0;
  double total() const;
};

// One rank of a world of `world_size` ranks with sequence parallelism P (real or emulated) on
// sequence length N (train.seq_len is ignored), under `recompute` and ZeRO `zero_stage`.
// cfg.runtime.overlap_comm counts the second layer gradient buffer of ZeRO 2 / 3 (core/zero3.h)
// in the CUDA layout's gradients item (the CPU layout cannot overlap).
// offload_checkpoints (runtime.offload = checkpoints, full recompute, CUDA layout only: ignored
// for the CPU layout, which cannot offload): the per-layer outputs leave the per-layer row for
// an extra item, "checkpoint slots on the device", of min(L, 3) x [B*N/P, C], and their
// pinned host copy goes to host_pinned_bytes. With it the item list has one more entry (in
// both layouts, 0 on the CPU, so that the two lists stay parallel).
MemoryEstimate estimate_memory(const Config& cfg, int world_size, int P, int N, Recompute recompute, int zero_stage,
                               MemoryLayout layout, bool offload_checkpoints = false);

// Longest N (a multiple of P * 128, up to 2^26) whose estimate fits `budget_bytes`; 0 if none.
// The budget is device (or process) memory; offloaded checkpoints' host memory is not counted.
int64_t longest_sequence(const Config& cfg, int world_size, int P, Recompute recompute, int zero_stage,
                         MemoryLayout layout, double budget_bytes, bool offload_checkpoints = false);

// "80GB", "80 GiB", "512MB", "1.5TB" -> bytes (GB = 1e9, GiB = 2^30); UserError naming `what`.
double parse_memory_size(const std::string& text, const std::string& what);

int run_estimate(const Config& cfg, const MpiRuntime& mpi, const EstimateOptions& opts);

}  // namespace ulysses
