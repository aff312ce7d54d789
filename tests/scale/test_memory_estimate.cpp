// The memory estimate (core/memory_estimate.h) against what a rank really holds: build the model
// and the optimizer for a config, run one training step, and compare the growth of the
// process's resident memory (VmRSS; the arenas are zero-filled when allocated, so every byte of
// them is resident) with the estimate less its fixed process baseline: within 10%, for recompute
// none / full + tiling / an emulated P = 4 rank with selective recompute. Also: the size parser.
#include <catch2/catch.hpp>
#include <malloc.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/emulate.h"
#include "core/base/error.h"
#include "core/memory_estimate.h"
#include "core/zero.h"
#include "tests/test_util.h"

using namespace ulysses;

namespace {

double resident_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;  // kB
  return -1;
}

struct Case {
  const char* name;
  int P;  // emulated when > 1
  Recompute recompute;
  int tile_tokens;
};

}  // namespace

TEST_CASE("the memory estimate matches the resident memory of a real rank within 10%", "[scale][memory]") {
  if (resident_bytes() < 0) return;  // no /proc: nothing to measure
  if (test::kAddressSanitizer) {
    WARN("not measured under AddressSanitizer: its allocator and shadow memory change the RSS");
    return;
  }
  // every large block its own mapping, returned on free: otherwise glibc raises its mmap threshold
  // after the first case and the next one reuses already-resident heap pages
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  Config cfg;
  cfg.model.n_layer = 2;
  cfg.model.n_embd = 128;
  cfg.model.n_head = 4;
  cfg.model.vocab_size = 256;
  cfg.model.max_seq_len = 1024;
  cfg.model.position_embedding = "rope";
  cfg.train.micro_batch_size = 2;
  const int N = 1024;
  for (const Case& c : {Case{"P 1, recompute none", 1, Recompute::none, 0},
                        Case{"P 1, recompute full, tile_tokens 512", 1, Recompute::full, 512},
                        Case{"emulated P 4, recompute selective", 4, Recompute::selective, 0}}) {
    DYNAMIC_SECTION(c.name) {
      cfg.runtime.tile_tokens = c.tile_tokens;
      const MemoryEstimate e = estimate_memory(cfg, 1, c.P, N, c.recompute, 0, MemoryLayout::cpu_fp32);
      const double estimated = e.total() - e.items.back().bytes;  // less the process baseline
      const double before = resident_bytes();
      double measured = 0;
      {
        EmulatedSequenceCommunicator world(1, 0), seq(c.P, 0);
        GPT model(cfg.model, {cfg.train.micro_batch_size, N, c.P, c.tile_tokens, c.recompute}, Device::cpu, &seq);
        ZeroAdamW opt(cfg.train, model.shape(), 0, world, Device::cpu);
        model.init_weights(1);
        const size_t BT = size_t(model.run_shape().rows());
        std::vector<int32_t> tok(BT), pos(BT);
        std::mt19937 rng(1);
        for (size_t i = 0; i < BT; ++i) {
          tok[i] = int32_t(rng() % 256);
          pos[i] = int32_t(i % size_t(model.run_shape().T()));
        }
        int64_t count = 0;
        model.zero_grad();
        model.forward_backward(tok.data(), tok.data(), pos.data(), &count);
        opt.reduce_gradients(model.context(), model.grads_padded());
        opt.update(model.context(), model.params_padded(), model.grads_padded(), 1e-4f, 1.f, 1);
        measured = resident_bytes() - before;
      }
      const double rel = (measured - estimated) / estimated;
      std::printf("memory | %-40s | estimated %8.1f MiB | measured RSS growth %8.1f MiB | %+.1f%%\n", c.name,
                  estimated / 1048576, measured / 1048576, 100 * rel);
      CHECK(std::abs(rel) < 0.10);
    }
  }
}

TEST_CASE("memory sizes parse with units and fail with a message", "[scale][memory]") {
  CHECK(parse_memory_size("80GB", "--gpu-memory") == 80e9);
  CHECK(parse_memory_size("80 GiB", "--gpu-memory") == 80.0 * (1ull << 30));
  CHECK(parse_memory_size("512MB", "--gpu-memory") == 512e6);
  CHECK(parse_memory_size("1.5tb", "--gpu-memory") == 1.5e12);
  CHECK_THROWS_WITH(parse_memory_size("lots", "--gpu-memory"), Catch::Contains("--gpu-memory 'lots'"));
  CHECK_THROWS_WITH(parse_memory_size("80XB", "--gpu-memory"), Catch::Contains("expected a positive size"));
  CHECK_THROWS_WITH(parse_memory_size("-3GB", "--gpu-memory"), Catch::Contains("expected a positive size"));
}

TEST_CASE("offloaded checkpoints: device slots replace the per-layer outputs, host memory beside", "[scale][memory]") {
  Config cfg;
  cfg.model.n_layer = 8;
  cfg.model.n_embd = 256;
  cfg.model.n_head = 4;
  cfg.model.vocab_size = 256;
  cfg.model.max_seq_len = 4096;
  cfg.model.position_embedding = "rope";
  cfg.train.micro_batch_size = 2;
  const int N = 4096, P = 2;
  const double layer = 2.0 * (N / P) * 256 * 2;  // [B*N/P, C] bf16
  const MemoryEstimate full = estimate_memory(cfg, P, P, N, Recompute::full, 1, MemoryLayout::cuda_bf16);
  const MemoryEstimate off = estimate_memory(cfg, P, P, N, Recompute::full, 1, MemoryLayout::cuda_bf16, true);
  REQUIRE(off.items.size() == full.items.size() + 1);
  CHECK(full.items[4].bytes == 8 * layer);  // "activations stored per layer": the 8 layer outputs
  CHECK(off.items[4].bytes == 0);
  CHECK(off.items[5].name.find("checkpoint slots") != std::string::npos);
  CHECK(off.items[5].bytes == 3 * layer);
  CHECK(off.host_pinned_bytes == 5 * layer);  // layers 0..4; 5..7 stay in the slots
  CHECK(full.host_pinned_bytes == 0);
  CHECK(full.total() - off.total() == 5 * layer);
  // the CPU layout cannot offload: the same bytes, plus an empty item to keep the lists parallel
  const MemoryEstimate cpu = estimate_memory(cfg, P, P, N, Recompute::full, 1, MemoryLayout::cpu_fp32);
  const MemoryEstimate cpu_off = estimate_memory(cfg, P, P, N, Recompute::full, 1, MemoryLayout::cpu_fp32, true);
  CHECK(cpu_off.items.size() == off.items.size());
  CHECK(cpu_off.total() == cpu.total());
  CHECK(cpu_off.host_pinned_bytes == 0);
  // with 3 layers or fewer nothing leaves the device: the slots are the per-layer outputs
  cfg.model.n_layer = 3;
  CHECK(estimate_memory(cfg, P, P, N, Recompute::full, 1, MemoryLayout::cuda_bf16, true).total() ==
        estimate_memory(cfg, P, P, N, Recompute::full, 1, MemoryLayout::cuda_bf16).total());
  // the longest sequence grows (the device budget excludes the host copy)
  cfg.model.n_layer = 8;
  const double budget = 2e9;
  const int64_t n_full = longest_sequence(cfg, P, P, Recompute::full, 1, MemoryLayout::cuda_bf16, budget);
  const int64_t n_off = longest_sequence(cfg, P, P, Recompute::full, 1, MemoryLayout::cuda_bf16, budget, true);
  std::printf("longest sequence within 2 GB, L 8, C 256, P 2: full %lld, full + offload %lld\n", (long long)n_full,
              (long long)n_off);
  CHECK(n_off > n_full);
  // the model refuses it where it cannot run (the config check names the keys first)
  EmulatedSequenceCommunicator seq(1, 0);
  GPTRunShape run{2, 256, 1, 0, Recompute::full};
  run.offload_checkpoints = true;
  cfg.model.max_seq_len = 256;
  CHECK_THROWS_WITH(GPT(cfg.model, run, Device::cpu, &seq),
                    Catch::Contains("runtime.offload 'checkpoints' needs runtime.recompute full and runtime.device cuda"));
  run.recompute = Recompute::selective;
  CHECK_THROWS_AS(GPT(cfg.model, run, Device::cpu, &seq), UserError);
}

TEST_CASE("runtime.overlap_comm: ZeRO 2 and 3 count a second layer gradient buffer on CUDA", "[scale][memory]") {
  Config cfg;
  cfg.model.n_layer = 2;
  cfg.model.n_embd = 64;
  cfg.model.n_head = 2;
  cfg.model.vocab_size = 256;
  cfg.model.max_seq_len = 128;
  cfg.train.micro_batch_size = 1;
  const int W = 3, N = 128;
  // one layer gradient buffer by hand (core/zero3.h, Layout): each of the 12 tensors of a layer
  // starts at a multiple of 128 elements; the block is split into W shards of a multiple of 128
  const int64_t C = 64;
  const int64_t layer_numel[12] = {C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C};
  auto round_up = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  int64_t block = 0;
  for (int64_t k : layer_numel) block += round_up(k, 128);
  REQUIRE(block == 50432);  // 6 x 128 (ln1w, ln1b, attprojb, ln2w, ln2b, fcprojb) + 2 x 256 + 49152
  const int64_t shard = round_up((block + W - 1) / W, 128);
  CHECK(shard == 16896);  // 16811 rounded up
  const double layer_grad_bytes = 4.0 * double(W * shard);
  for (int stage : {0, 1, 2, 3}) {
    CAPTURE(stage);
    cfg.runtime.overlap_comm = false;
    const MemoryEstimate plain = estimate_memory(cfg, W, 1, N, Recompute::none, stage, MemoryLayout::cuda_bf16);
    const MemoryEstimate plain_cpu = estimate_memory(cfg, W, 1, N, Recompute::none, stage, MemoryLayout::cpu_fp32);
    cfg.runtime.overlap_comm = true;
    const MemoryEstimate overlap = estimate_memory(cfg, W, 1, N, Recompute::none, stage, MemoryLayout::cuda_bf16);
    const MemoryEstimate overlap_cpu = estimate_memory(cfg, W, 1, N, Recompute::none, stage, MemoryLayout::cpu_fp32);
    REQUIRE(overlap.items.size() == plain.items.size());
    // only the gradients row (2) changes, by one layer buffer at ZeRO 2 / 3; ZeRO 0 / 1 all-reduce
    // in place (core/zero.h) and the CPU layout cannot overlap
    const double extra = stage >= 2 ? layer_grad_bytes : 0;
    CHECK(overlap.items[2].bytes - plain.items[2].bytes == extra);
    CHECK(overlap.total() - plain.total() == extra);
    CHECK(overlap_cpu.total() == plain_cpu.total());
  }
}
