// The per-rank memory estimate (see core/memory_estimate.h).
//
// Items and their sizes for n parameters (n_pad: padded to a multiple of the world size W), as
// GPT (core/gpt.h), ZeroAdamW (core/zero.h, ZeRO 0 / 1) and core/zero3.h (ZeRO 2 / 3) allocate
// them:
//                          CPU fp32                           CUDA (bf16 compute)
//   parameters             4 n_pad                            4 n_pad, the fp32 master weights
//   bf16 compute copy      -                                  2 n_pad (what forward/backward read)
//   gradients              4 n_pad                            the same (fp32)
//   optimizer m, v         8 n_pad, / W at ZeRO 1             the same (fp32)
// ZeRO 2 and 3 (core/zero3.h, LayerShardLayout): Z = L·S + R elements per rank of each sharded
// array (S a layer block's shard, R the rest's: wte, wpe, lnfw, lnfb), blk = W·S one layer block,
// rest = W·R, held = what the model stores (n_pad at ZeRO 2, rest at ZeRO 3), bufs = the layer
// buffers the parameters are gathered into (1 at ZeRO 2, 2 at ZeRO 3):
//   parameters             4 held + 4 Z (the fp32 master      4 Z (the fp32 master shards only:
//                          shards) + 4 bufs·blk               the model has none, master_weights)
//   bf16 compute copy      -                                  2 held + 2 Z + 2 bufs·blk (the
//                                                             gathered layers in bf16)
//   gradients              4 rest + 4 Z + 4 gbufs·blk (the model's rest, the shards, the layer
//                          gradient buffers: gbufs = 2 with runtime.overlap_comm on CUDA, else 1),
//                          fp32 in both columns
// runtime.overlap_comm allocates nothing else: at ZeRO 0 / 1 the per-layer all-reduces are in
// place in the model's gradient buffer, and stage 3 has its two layer buffers either way.
//   optimizer m, v         8 Z                                8 Z
//   activations            GPT::activation_layout(device): fp32 on the CPU; on CUDA bf16 except
//                          the LayerNorm / softmax statistics and the losses (fp32)
//   checkpoint slots       runtime.offload = checkpoints (CUDA, full recompute): min(L, 3) slots of
//                          2 B(N/P)C bytes replace the L per-layer outputs; the offloaded ones,
//                          max(0, L - 3) x 2 B(N/P)C, are pinned host memory (host_pinned_bytes)
//   attention scratch      the CPU attention kernels' (the    - (the CUDA kernels' few bytes per
//                          keys and values rearranged, per-     row and head are in the runtime
//                          thread tiles; the larger of          item)
//                          forward and backward), which the
//                          model's context keeps
//   runtime                process baseline (binary, MPI, BLAS): 64 MiB on the CPU; CUDA context,
//                          cuBLASLt workspace and NCCL buffers: 1.5 GiB
#include "core/memory_estimate.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>

#include <fmt/format.h>
#include <omp.h>
#include <spdlog/spdlog.h>

#include "comm/ulysses.h"
#include "core/emulate.h"
#include "core/base/error.h"
#include "core/zero.h"
#include "core/zero3.h"
#include "kernels/cpu/cpu_ops.h"

namespace ulysses {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kCpuBaseline = 64.0 * 1024 * 1024;
constexpr double kCudaRuntime = 1.5 * kGiB;

// The CPU attention kernels' scratch, which the model's context keeps from the first step on:
// the larger of forward and backward, for runtime.threads threads (0: this process's OpenMP
// default, which is what a rank alone on this machine would get).
size_t cpu_attention_scratch_floats(const Config& cfg, const GPTShape& s, int N, int hq, int hkv) {
  const int threads = cfg.runtime.threads > 0 ? cfg.runtime.threads : omp_get_max_threads();
  const int B = cfg.train.micro_batch_size;
  return std::max(cpu::attention_forward_scratch_floats(B, N, hq, hkv, s.d, threads),
                  cpu::attention_backward_scratch_floats(B, N, hq, hkv, s.d, threads));
}

}  // namespace

double MemoryEstimate::total() const {
  double t = 0;
  for (const auto& i : items) t += i.bytes;
  return t;
}

MemoryEstimate estimate_memory(const Config& cfg, int world_size, int P, int N, Recompute recompute, int zero_stage,
                               MemoryLayout layout, bool offload_checkpoints) {
  ModelConfig m = cfg.model;
  if (!m.rope()) m.max_seq_len = std::max(m.max_seq_len, N);  // the learned position table covers N
  const GPTShape s = GPTShape::from(m);
  const double W = world_size;
  const double n = double(num_parameters(s)), n_pad = double(ZeroAdamW::padded_count(int64_t(n), world_size));
  const bool cpu = layout == MemoryLayout::cpu_fp32;
  MemoryEstimate e;
  auto add = [&](std::string name, double bytes) { e.items.push_back({std::move(name), bytes}); };
  // the same items in both layouts (the table prints them side by side)
  if (zero_stage <= 1) {
    add("parameters (fp32; the master weights on CUDA)", 4 * n_pad);
    add("bf16 compute copy of the parameters (CUDA)", cpu ? 0 : 2 * n_pad);
    add("gradients (fp32)", 4 * n_pad);
    add("optimizer m, v (fp32)", zero_stage >= 1 ? 8 * n_pad / W : 8 * n_pad);
  } else {
    const LayerShardLayout lay = LayerShardLayout::make(s, world_size);
    const double Z = double(s.L) * double(lay.shard) + double(lay.rest_shard), blk = double(lay.block());
    const double rest = double(lay.rest_padded()), held = zero_stage == 3 ? rest : n_pad;
    const double bufs = zero_stage == 3 ? 2 : 1;
    // runtime.overlap_comm (CUDA only): the layers alternate between two gradient buffers
    const double grad_bufs = cfg.runtime.overlap_comm && !cpu ? 2 : 1;
    add("parameters (fp32; the master weights on CUDA)", cpu ? 4 * held + 4 * Z + 4 * bufs * blk : 4 * Z);
    add("bf16 compute copy of the parameters (CUDA)", cpu ? 0 : 2 * held + 2 * Z + 2 * bufs * blk);
    add("gradients (fp32: the rest, shards, layer buffers)", 4 * rest + 4 * Z + 4 * grad_bufs * blk);
    add("optimizer m, v (fp32)", 8 * Z);
  }
  // activations: the model's own layout for rank 0 of the sequence group
  int hq = s.Hq, hkv = s.Hkv;
  size_t scratch = 0;
  if (P > 1) {
    EmulatedSequenceCommunicator seq(P, 0);
    UlyssesAllToAll a2a(&seq, plan_ulysses_heads(s.Hq, s.Hkv, P), cfg.train.micro_batch_size, N / P, s.d);
    hq = a2a.plan().local_q_heads(0);
    hkv = a2a.plan().local_kv_heads(0);
    scratch = a2a.scratch_elements();
  }
  GPTRunShape run{cfg.train.micro_batch_size, N, P, cfg.runtime.tile_tokens, recompute};
  ULYSSES_ASSERT(!offload_checkpoints || recompute == Recompute::full, "offloaded checkpoints need full recompute");
  run.offload_checkpoints = offload_checkpoints && !cpu;  // a GPU feature: the CPU layout keeps them
  std::map<std::string, double> by_kind;
  double per_layer = 0;
  for (const ActivationBuffer& b :
       GPT::activation_layout(s, run, hq, hkv, scratch, cpu ? Device::cpu : Device::cuda)) {
    const double bytes = double(b.bytes);
    if (b.kind == "layer" && b.layer >= 0)
      per_layer += bytes;
    else
      by_kind[b.kind] += bytes;
  }
  add(fmt::format("activations stored per layer (x {} layers)", s.L), per_layer);
  if (offload_checkpoints) {
    add("checkpoint slots on the device (runtime.offload)", by_kind["checkpoint_slots"]);
    if (!cpu)
      e.host_pinned_bytes = double(offloaded_checkpoint_layers(s.L)) * double(run.rows()) * s.C * 2;  // bf16
  }
  add("attention statistics (lse, LayerNorm mean/rstd)", by_kind["attention_stats"]);
  add("recompute workspace (shared by the layers)", by_kind["recompute"]);
  add("communication buffers (all-to-all send/recv, local qkv)", by_kind["comm"]);
  add("backward workspace (activation gradients)", by_kind["backward"]);
  add("attention scratch (CPU kernels: keys and values, tiles)",
      cpu ? 4.0 * double(cpu_attention_scratch_floats(cfg, s, N, hq, hkv)) : 0.0);
  add("inputs, embedding output, LM head + loss chunk", by_kind["inputs"] + by_kind["layer"] + by_kind["lm_head"]);
  add(cpu ? "process baseline (binary, MPI, BLAS)" : "CUDA context, cuBLASLt workspace, NCCL buffers",
      cpu ? kCpuBaseline : kCudaRuntime);
  return e;
}

int64_t longest_sequence(const Config& cfg, int world_size, int P, Recompute recompute, int zero_stage,
                         MemoryLayout layout, double budget_bytes, bool offload_checkpoints) {
  const int64_t unit = int64_t(P) * 128;
  auto fits = [&](int64_t k) {
    return estimate_memory(cfg, world_size, P, int(k * unit), recompute, zero_stage, layout, offload_checkpoints)
               .total() <= budget_bytes;
  };
  int64_t lo = 0, hi = (int64_t(1) << 26) / unit;  // fits(lo) or lo == 0
  if (hi >= 1 && fits(hi)) return hi * unit;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    (mid > 0 && fits(mid) ? lo : hi) = mid;
  }
  return lo * unit;
}

double parse_memory_size(const std::string& text, const std::string& what) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw_user_error("{} '{}': expected a size such as 80GB, 80GiB or 512MB", what, text);
  }
  std::string unit;
  for (size_t i = pos; i < text.size(); ++i)
    if (!std::isspace(static_cast<unsigned char>(text[i]))) unit += char(std::toupper(static_cast<unsigned char>(text[i])));
  static const std::map<std::string, double> units = {
      {"", 1e9},     {"B", 1},       {"KB", 1e3},    {"MB", 1e6},     {"GB", 1e9},     {"TB", 1e12},
      {"KIB", 1024}, {"MIB", 1 << 20}, {"GIB", kGiB}, {"TIB", kGiB * 1024}, {"G", 1e9}, {"M", 1e6}};
  const auto it = units.find(unit);
  if (it == units.end() || !(value > 0))
    throw_user_error("{} '{}': expected a positive size such as 80GB, 80GiB or 512MB", what, text);
  return value * it->second;
}

int run_estimate(const Config& cfg, const MpiRuntime& mpi, const EstimateOptions& opts) {
  const int P = cfg.parallel.emulate_sequence > 1 ? cfg.parallel.emulate_sequence : cfg.parallel.sequence;
  const int W = opts.gpus > 0 ? opts.gpus : P;
  if (W % P != 0) throw_user_error("--gpus {}: must be a multiple of the sequence-parallel degree {}", W, P);
  const double budget = parse_memory_size(opts.gpu_memory, "--gpu-memory");
  const int N = cfg.train.seq_len;
  const Recompute rc = parse_recompute(cfg.runtime.recompute);
  const bool offload = cfg.runtime.offload == "checkpoints";  // the config checked: recompute full
  const int Z = cfg.parallel.zero_stage;
  if (mpi.world_rank != 0) return 0;
  const GPTShape s = GPTShape::from(cfg.model);
  std::string out;
  out += fmt::format("memory per rank: {} layers, {} wide, {} heads, {:.3f}B parameters; N = {}, B = {}, P = {}, "
                     "{} ranks (DP {}); recompute {}{}, ZeRO {}{}, tile_tokens {}\n",
                     s.L, s.C, s.Hq, double(num_parameters(s)) / 1e9, N, cfg.train.micro_batch_size, P, W, W / P,
                     cfg.runtime.recompute, offload ? " + offloaded checkpoints" : "", Z,
                     cfg.runtime.overlap_comm ? " + overlap_comm" : "", cfg.runtime.tile_tokens);
  const MemoryEstimate cpu = estimate_memory(cfg, W, P, N, rc, Z, MemoryLayout::cpu_fp32, offload);
  const MemoryEstimate gpu = estimate_memory(cfg, W, P, N, rc, Z, MemoryLayout::cuda_bf16, offload);
  out += fmt::format("  {:<58} {:>14} {:>14}\n", "item", "CPU fp32 GiB", "CUDA bf16 GiB");
  // (the CUDA column: bf16 compute copy and activations, fp32 master weights, gradients, m, v)
  for (size_t i = 0; i < cpu.items.size(); ++i)
    out += fmt::format("  {:<58} {:>14.3f} {:>14.3f}\n", i + 1 == cpu.items.size() ? "runtime (CPU process baseline | CUDA context, NCCL)" : cpu.items[i].name,
                       cpu.items[i].bytes / kGiB, gpu.items[i].bytes / kGiB);
  out += fmt::format("  {:<58} {:>14.3f} {:>14.3f}\n", "total", cpu.total() / kGiB, gpu.total() / kGiB);
  if (offload)
    out += fmt::format("  {:<58} {:>14} {:>14.3f}\n", "pinned host memory: offloaded checkpoints (not in the total)", "-",
                       gpu.host_pinned_bytes / kGiB);
  out += fmt::format("longest sequence per {} ranks (P = {}) within {} ({:.1f} GiB) per rank, B = {}, tile_tokens {}:\n",
                     W, P, opts.gpu_memory, budget / kGiB, cfg.train.micro_batch_size, cfg.runtime.tile_tokens);
  out += fmt::format("  {:<13} {:>6} {:>16} {:>16}\n", "recompute", "ZeRO", "CPU fp32", "CUDA bf16");
  for (Recompute r : {Recompute::none, Recompute::selective, Recompute::full})
    for (int z = 0; z <= 3; ++z)
      out += fmt::format("  {:<13} {:>6} {:>16} {:>16}\n", recompute_name(r), z,
                         longest_sequence(cfg, W, P, r, z, MemoryLayout::cpu_fp32, budget),
                         longest_sequence(cfg, W, P, r, z, MemoryLayout::cuda_bf16, budget));
  // runtime.offload = checkpoints: a GPU choice only; its host memory at that length beside it
  for (int z = 0; z <= 3; ++z) {
    const int64_t n_offload = longest_sequence(cfg, W, P, Recompute::full, z, MemoryLayout::cuda_bf16, budget, true);
    const double host =
        n_offload > 0
            ? estimate_memory(cfg, W, P, int(n_offload), Recompute::full, z, MemoryLayout::cuda_bf16, true).host_pinned_bytes
            : 0;
    out += fmt::format("  {:<13} {:>6} {:>16} {:>16}   (pinned host {:.1f} GiB)\n", "full+offload", z, "-", n_offload,
                       host / kGiB);
  }
  out += "(every row: what the model and the optimizer allocate, up to 256-byte alignment)\n";
  const bool cuda = cfg.runtime.device == "cuda";
  out += fmt::format("runtime.device {}: the {} columns apply to this config\n", cfg.runtime.device,
                     cuda ? "CUDA bf16" : cfg.runtime.device == "cpu" ? "CPU fp32" : "CUDA (with a GPU) or CPU");
  fmt::print("{}", out);
  return 0;
}

}  // namespace ulysses
