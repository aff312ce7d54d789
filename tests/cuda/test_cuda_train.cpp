// The real trainer (run_train, in process) on a GPU, against the CPU and against itself:
//   (a) 10 steps of a small model on cuda and on cpu from the same init (seeded, host-side) and
//       the same data: every training and validation loss within kCpuTolerance (relative), and
//       the loss falls by much more than that tolerance, so a wrong gradient cannot hide in it;
//   (b) the cuda run repeated gives bit-identical losses (deterministic kernels, fixed order);
//   (c) 4 ranks sharing one GPU, SP = 4, ZeRO 2 and 3, backend mpi (staged through pinned host
//       memory) reproduce the 1-rank cuda run (rank 0 alone, on MPI_COMM_SELF) within kSpTolerance;
//   (d) the NCCL backend on 1 rank trains 3 steps with losses bit-identical to the staged MPI
//       backend's (a 1-rank all-reduce is an identity on both);
//   (e) a checkpoint written on cuda and resumed continues with bit-identical losses (ZeRO 0,
//       1, 2 and 3), and the llm.c export holds the final checkpoint's weights;
//   (f) ZeRO 2 and 3 (per layer, core/zero3.h) on cuda: within kCpuTolerance of the cpu, and
//       ZeRO 3 against ZeRO 0 on cuda: the first loss bitwise (the same bf16 weights), every
//       loss within kStageTolerance; both also sample (ZeRO 2 on the shared compute copy, ZeRO 3
//       on a gathered CPU copy); the 4-rank case (c) runs ZeRO 3 too;
//   (g) what LayerShardedZero and the model allocate on cuda is what `ulysses estimate` says
//       (its ZeRO 2 / 3 rows, to the byte, with and without runtime.overlap_comm), on 1 rank and on 4;
//   (h) runtime.overlap_comm gives bitwise the losses without it: ZeRO 2 and 3 on 1 and 4 ranks,
//       ZeRO 0 and 1 on 1 rank and on 2 (ranks 0, 1 of the 4-rank job).
//   (i) SP = 4 with runtime.all_to_all_chunks = 4 (4 ranks, staged MPI): the losses of 1 chunk
//       within kSpTolerance, and bitwise on repeat.
// Tolerances (bf16 weights and activations against fp32): kCpuTolerance = 2e-2 relative on the
// loss (bf16 rounds to 2^-9 relative per op; over 10 steps the losses of the two typically differ
// by 1e-3..5e-3); kSpTolerance = 5e-3 (both sides bf16; only the GEMM row counts and the gradient
// summation order differ); kStageTolerance = 1e-3 (the same kernels on the same bf16 weights;
// only the gradient norm's summation order differs, which can move the clip factor by an ulp).
// The data: a byte-level text from a small grammar, so the loss falls
// from ln(256) = 5.55 by more than 1 in 10 steps (5.58 -> 2.74 on the cpu). The learning rate is
// one at which those 10 steps have no loss spike (at 1e-3 and above the cpu run spikes near step
// 5, where any two precisions part by more than a rounding error).
//
// Registered twice (tests/cuda/CMakeLists.txt): 1 rank runs [one_rank], mpirun -np 4 runs
// [four_ranks]. Without a CUDA device every rank exits 77 (CTest: SKIPPED).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <mpi.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "comm/bootstrap.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/data.h"
#include "core/base/error.h"
#include "core/gpt.h"
#include "comm/groups.h"
#include "core/llmc.h"
#include "core/memory_estimate.h"
#include "core/trainer.h"
#include "tests/test_util.h"
#include "core/zero.h"
#include "core/zero3.h"
#include "tests/mpi_test_util.h"

namespace fs = std::filesystem;
using namespace ulysses;
using ulysses::test::world_size;

namespace {

constexpr double kCpuTolerance = 2e-2;
constexpr double kSpTolerance = 5e-3;
constexpr double kStageTolerance = 1e-3;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
// One scratch directory per job (rank 0's pid, shared with the other ranks).
fs::path job_dir(const std::string& name) {
  int pid = int(::getpid());
  MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
  const fs::path p = fs::temp_directory_path() / ("ulysses_test_cuda_train_" + name + "_" + std::to_string(pid));
  if (world_rank() == 0) {
    fs::remove_all(p);
    fs::create_directories(p);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return p;
}

// train.bin / val.bin: sentences of a small grammar, one byte per token.
void write_text_shards(const fs::path& dir) {
  if (world_rank() == 0) {
    std::mt19937 rng(11);
    const char* subjects[] = {"the cat", "a dog", "the old king", "my friend", "a bird"};
    const char* verbs[] = {"sees", "likes", "follows", "finds", "hears"};
    const char* objects[] = {"the moon.", "a red ball.", "the river.", "his shadow.", "the sea."};
    std::string text;
    while (text.size() < 80000)
      text += std::string(subjects[rng() % 5]) + " " + verbs[rng() % 5] + " " + objects[rng() % 5] + "\n";
    std::vector<uint16_t> tokens(text.begin(), text.end());
    const size_t split = tokens.size() * 9 / 10;
    write_token_shard((dir / "train.bin").string(), std::vector<uint16_t>(tokens.begin(), tokens.begin() + long(split)));
    write_token_shard((dir / "val.bin").string(), std::vector<uint16_t>(tokens.begin() + long(split), tokens.end()));
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// A 2-layer, 256-wide GPT (4 heads of 64: a CUDA attention head size), 8 x 128 tokens per step.
Config small_config(const fs::path& dir, const std::vector<std::string>& extra) {
  std::vector<std::string> sets = {
      "model.n_layer=2",       "model.n_embd=256",     "model.n_head=4",          "model.vocab_size=256",
      "model.max_seq_len=256", "train.seq_len=128",    "train.micro_batch_size=8", "train.max_steps=10",
      "train.warmup_steps=2",  "train.lr=6e-4",        "train.eval_interval=5",    "train.eval_steps=2",
      "data.source=shards",    "data.train=[" + (dir / "train.bin").string() + "]",
      "data.val=[" + (dir / "val.bin").string() + "]", "runtime.threads=4",       "logging.level=warn"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

// Runs `ulysses train` in process over `comm` (MPI_COMM_WORLD, or MPI_COMM_SELF for a 1-rank run
// inside a larger job).
int train(const Config& cfg, MPI_Comm comm = MPI_COMM_WORLD) {
  MpiRuntime mpi(comm);
  return run_train(cfg, mpi);
}

using ulysses::test::field_values;  // tests/test_util.h
std::vector<double> numbers(const std::vector<std::string>& v) {
  std::vector<double> out;
  for (const std::string& s : v) out.push_back(std::stod(s));
  return out;
}

// max_i |a_i - b_i| / |b_i|; +inf when the sizes differ, a value is not finite or there is none
double max_relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    worst = std::max(worst, std::fabs(a[i] - b[i]) / std::fabs(b[i]));
  }
  return worst;
}

std::string metrics_of(const fs::path& dir, const std::string& name) {
  return "logging.metrics_file=" + (dir / (name + ".jsonl")).string();
}

// (g) A model and LayerShardedZero at `stage` on cuda over the ranks of `comm` (staged MPI, every
// rank on the same GPU): their buffers against the estimate's rows, byte for byte. The rows are
// 0 parameters (fp32), 1 bf16 compute copy, 2 gradients, 3 optimizer m, v (core/memory_estimate.cpp).
// overlap_comm: LayerShardedZero's second layer gradient buffer (core/zero3.h) against the row.
void check_zero_memory_rows(int stage, MPI_Comm comm, bool overlap_comm = false) {
  CAPTURE(stage);
  CAPTURE(overlap_comm);
  Config cfg;
  cfg.runtime.overlap_comm = overlap_comm;  // what the estimate reads
  cfg.model.n_layer = 3;
  cfg.model.n_embd = 96;  // a shard that does not divide evenly: padding in every row
  cfg.model.n_head = 3;
  cfg.model.vocab_size = 300;
  cfg.model.max_seq_len = 64;
  cfg.train.micro_batch_size = 1;
  cfg.train.seq_len = 64;
  ProcessGroups groups = make_process_groups(1, CommBackend::mpi, Device::cuda, comm);
  const int W = groups.world_size;
  GPTRunShape run{1, 64, 1, 0, Recompute::none, W};
  run.sharded_layer_grads = true;
  run.sharded_layer_params = stage == 3;
  run.master_weights = false;
  GPT model(cfg.model, run, Device::cuda, nullptr);
  groups.set_stream(model.context().stream());
  LayerShardedZero zero(cfg.train, model, stage, *groups.world, &groups.host_world(), overlap_comm);
  REQUIRE(zero.overlap_comm() == overlap_comm);
  const MemoryEstimate e = estimate_memory(cfg, W, 1, 64, Recompute::none, stage, MemoryLayout::cuda_bf16);
  REQUIRE(e.items.size() > 4);
  CHECK(model.params_padded().bytes() == 0);  // no fp32 master in the model
  // parameters + compute copy together (parameter_bytes(): the fp32 master and bf16 compute
  // shards and the bf16 layer buffers); the fp32 row alone: the master shards, as large as m
  CHECK(double(model.compute_params_padded().bytes() + zero.parameter_bytes()) == e.items[0].bytes + e.items[1].bytes);
  CHECK(e.items[0].bytes == double(zero.state_bytes()) / 2);
  const int64_t held = stage == 3 ? zero.layout().rest_padded() : ZeroAdamW::padded_count(num_parameters(model.shape()), W);
  CHECK(model.compute_params_padded().bytes() == size_t(held) * 2);
  CHECK(double(model.grads_padded().bytes() + zero.gradient_bytes()) == e.items[2].bytes);
  CHECK(double(zero.state_bytes()) == e.items[3].bytes);
}

}  // namespace

TEST_CASE("cuda training matches the cpu, repeats bit for bit, and samples", "[one_rank]") {
  const fs::path dir = job_dir("match");
  write_text_shards(dir);
  REQUIRE(train(small_config(dir, {"runtime.device=cpu", metrics_of(dir, "cpu")})) == 0);
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", metrics_of(dir, "cuda1"), "train.sample_tokens=32"})) == 0);
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", metrics_of(dir, "cuda2")})) == 0);

  const auto cpu = numbers(field_values(dir / "cpu.jsonl", "loss"));
  const auto cuda = numbers(field_values(dir / "cuda1.jsonl", "loss"));
  REQUIRE(cpu.size() == 10);
  REQUIRE(cuda.size() == 10);
  // (a) the comparison means something: the loss falls far more than the tolerance
  INFO("cpu loss " << cpu.front() << " -> " << cpu.back() << ", cuda " << cuda.front() << " -> " << cuda.back());
  REQUIRE(cpu.front() - cpu.back() > 1.0);
  const double train_diff = max_relative_difference(cuda, cpu);
  const double val_diff = max_relative_difference(numbers(field_values(dir / "cuda1.jsonl", "val_loss")),
                                                  numbers(field_values(dir / "cpu.jsonl", "val_loss")));
  std::printf("test_cuda_train: max relative loss difference cuda vs cpu: train %.3g, val %.3g (tolerance %.3g); "
              "cpu loss %.4f -> %.4f\n", train_diff, val_diff, kCpuTolerance, cpu.front(), cpu.back());
  INFO("max relative loss difference cuda vs cpu: train " << train_diff << ", val " << val_diff);
  CHECK(train_diff < kCpuTolerance);
  CHECK(val_diff < kCpuTolerance);
  // (b) bit for bit (the sampler at the end of run 1 changes nothing before it)
  CHECK(field_values(dir / "cuda2.jsonl", "loss") == field_values(dir / "cuda1.jsonl", "loss"));
  CHECK(field_values(dir / "cuda2.jsonl", "val_loss") == field_values(dir / "cuda1.jsonl", "val_loss"));
  CHECK(field_values(dir / "cuda2.jsonl", "grad_norm") == field_values(dir / "cuda1.jsonl", "grad_norm"));
  fs::remove_all(dir);
}

TEST_CASE("nccl on one rank trains exactly like staged mpi", "[one_rank]") {
  const fs::path dir = job_dir("nccl");
  write_text_shards(dir);
  // (d)
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", "parallel.backend=nccl", "train.max_steps=3",
                                   metrics_of(dir, "nccl")})) == 0);
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", "parallel.backend=mpi", "train.max_steps=3",
                                   metrics_of(dir, "mpi")})) == 0);
  const auto nccl = field_values(dir / "nccl.jsonl", "loss");
  REQUIRE(nccl.size() == 3);
  for (double l : numbers(nccl)) CHECK(std::isfinite(l));
  CHECK(nccl == field_values(dir / "mpi.jsonl", "loss"));
  CHECK(field_values(dir / "nccl.jsonl", "grad_norm") == field_values(dir / "mpi.jsonl", "grad_norm"));
  fs::remove_all(dir);
}

TEST_CASE("a cuda checkpoint resumes bit for bit; the llm.c export holds the final weights", "[one_rank]") {
  const fs::path dir = job_dir("resume");
  write_text_shards(dir);
  for (int stage : {0, 1, 2, 3}) {
    CAPTURE(stage);
    const std::string zero = "parallel.zero_stage=" + std::to_string(stage);
    const std::string ckpt = (dir / ("ckpt" + std::to_string(stage))).string();
    const std::string exported = (dir / ("model" + std::to_string(stage) + ".bin")).string();
    // (e) uninterrupted: 8 steps, checkpoints every 4
    REQUIRE(train(small_config(dir, {"runtime.device=cuda", zero, "train.max_steps=8", "checkpoint.dir=" + ckpt,
                                     "checkpoint.interval=4", "checkpoint.keep_last=10",
                                     "checkpoint.export_llmc=" + exported, metrics_of(dir, "full")})) == 0);
    REQUIRE(verify_checkpoint(ckpt + "/step_00000004").empty());
    REQUIRE(train(small_config(dir, {"runtime.device=cuda", zero, "train.max_steps=8",
                                     "checkpoint.resume=" + ckpt + "/step_00000004",
                                     metrics_of(dir, "resumed")})) == 0);
    const auto full = field_values(dir / "full.jsonl", "loss");
    const auto resumed = field_values(dir / "resumed.jsonl", "loss");
    REQUIRE(full.size() == 8);
    REQUIRE(resumed.size() == 4);
    for (size_t i = 0; i < 4; ++i) CHECK(resumed[i] == full[4 + i]);

    const Config cfg = small_config(dir, {});
    const GPTShape shape = GPTShape::from(cfg.model);
    const int64_t n = num_parameters(shape);
    std::vector<float> from_export(size_t(n), 0.f), from_checkpoint(size_t(n), 1.f);
    read_llmc_checkpoint(exported, llmc_header_for(cfg.model), from_export.data(), size_t(n));
    load_checkpoint(ckpt + "/step_00000008", shape, from_checkpoint.data(), nullptr, nullptr, n);
    CHECK(from_export == from_checkpoint);
    fs::remove(dir / "full.jsonl");
    fs::remove(dir / "resumed.jsonl");
  }
  fs::remove_all(dir);
}

TEST_CASE("ZeRO 2 and 3 on cuda match the cpu and ZeRO 0, and sample", "[one_rank]") {
  const fs::path dir = job_dir("zero3");
  write_text_shards(dir);
  // (f) the references: the cpu at ZeRO 0 (tests/scale/test_zero3 holds the cpu's ZeRO 2, 3 to
  // it) and cuda at ZeRO 0
  REQUIRE(train(small_config(dir, {"runtime.device=cpu", metrics_of(dir, "cpu")})) == 0);
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", metrics_of(dir, "cuda0")})) == 0);
  const auto cpu = numbers(field_values(dir / "cpu.jsonl", "loss"));
  const auto cpu_val = numbers(field_values(dir / "cpu.jsonl", "val_loss"));
  REQUIRE(cpu.size() == 10);
  REQUIRE(cpu.front() - cpu.back() > 1.0);
  for (int stage : {2, 3}) {
    CAPTURE(stage);
    const std::string name = "cuda_zero" + std::to_string(stage);
    REQUIRE(train(small_config(dir, {"runtime.device=cuda", "parallel.zero_stage=" + std::to_string(stage),
                                     "train.sample_tokens=16", metrics_of(dir, name)})) == 0);
    const auto losses = numbers(field_values(dir / (name + ".jsonl"), "loss"));
    REQUIRE(losses.size() == 10);
    const double cpu_diff = max_relative_difference(losses, cpu);
    const double val_diff = max_relative_difference(numbers(field_values(dir / (name + ".jsonl"), "val_loss")), cpu_val);
    const double stage0_diff = max_relative_difference(losses, numbers(field_values(dir / "cuda0.jsonl", "loss")));
    std::printf("test_cuda_train: ZeRO %d on cuda: max relative loss difference vs cpu: train %.3g, val %.3g "
                "(tolerance %.3g); vs cuda ZeRO 0: %.3g (tolerance %.3g)\n",
                stage, cpu_diff, val_diff, kCpuTolerance, stage0_diff, kStageTolerance);
    INFO("vs cpu: train " << cpu_diff << ", val " << val_diff << "; vs cuda ZeRO 0: " << stage0_diff);
    CHECK(cpu_diff < kCpuTolerance);
    CHECK(val_diff < kCpuTolerance);
    CHECK(stage0_diff < kStageTolerance);
    // the first step reads the same bf16 weights (the same init, cast the same way): bitwise
    CHECK(field_values(dir / (name + ".jsonl"), "loss").front() == field_values(dir / "cuda0.jsonl", "loss").front());
  }
  fs::remove_all(dir);
}

TEST_CASE("ZeRO 2 and 3 on cuda allocate what the estimate says (1 rank)", "[one_rank]") {
  // (g)
  for (int stage : {2, 3})
    for (bool overlap : {false, true}) check_zero_memory_rows(stage, MPI_COMM_SELF, overlap);
}

TEST_CASE("SP=4 on 4 ranks sharing one GPU (staged MPI, ZeRO 2 and 3) reproduces the 1-rank cuda run",
          "[four_ranks]") {
  if (world_size() != 4) {
    WARN("needs mpirun -np 4; skipped");
    return;
  }
  const fs::path dir = job_dir("sp4");
  write_text_shards(dir);
  // (g) on 4 ranks: shards with padding
  for (int stage : {2, 3})
    for (bool overlap : {false, true}) check_zero_memory_rows(stage, MPI_COMM_WORLD, overlap);
  // (c) all 4 ranks: SP = 4 (auto picks mpi here, since the ranks share a GPU: forced to be sure),
  // ZeRO 2 and ZeRO 3 (per layer, sharded over the 4 ranks)
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", "parallel.sequence=4", "parallel.backend=mpi",
                                   "parallel.zero_stage=2", metrics_of(dir, "sp4")})) == 0);
  REQUIRE(train(small_config(dir, {"runtime.device=cuda", "parallel.sequence=4", "parallel.backend=mpi",
                                   "parallel.zero_stage=3", metrics_of(dir, "sp4_zero3")})) == 0);
  // rank 0 alone: the 1-rank reference (no REQUIRE in here: the other ranks wait at the Bcast)
  int ok = 1;
  if (world_rank() == 0) {
    const int rc = train(small_config(dir, {"runtime.device=cuda", "parallel.backend=mpi", metrics_of(dir, "one")}),
                         MPI_COMM_SELF);
    const auto one = numbers(field_values(dir / "one.jsonl", "loss"));
    const auto sp4 = numbers(field_values(dir / "sp4.jsonl", "loss"));
    const auto sp4_zero3 = numbers(field_values(dir / "sp4_zero3.jsonl", "loss"));
    const double train_diff = std::max(max_relative_difference(sp4, one), max_relative_difference(sp4_zero3, one));
    const double val_diff =
        std::max(max_relative_difference(numbers(field_values(dir / "sp4.jsonl", "val_loss")),
                                         numbers(field_values(dir / "one.jsonl", "val_loss"))),
                 max_relative_difference(numbers(field_values(dir / "sp4_zero3.jsonl", "val_loss")),
                                         numbers(field_values(dir / "one.jsonl", "val_loss"))));
    INFO("1 rank: exit " << rc << ", loss " << (one.empty() ? 0 : one.front()) << " -> "
                         << (one.empty() ? 0 : one.back()));
    std::printf("test_cuda_train: max relative loss difference SP=4 (ZeRO 2 and 3) vs 1 rank: train %.3g, val %.3g "
                "(tolerance %.3g)\n", train_diff, val_diff, kSpTolerance);
    INFO("max relative loss difference SP=4 vs 1 rank: train " << train_diff << ", val " << val_diff);
    CHECK(rc == 0);
    CHECK(one.size() == 10);
    CHECK((one.size() == 10 && one.front() - one.back() > 1.0));
    CHECK(train_diff < kSpTolerance);
    CHECK(val_diff < kSpTolerance);
    ok = rc == 0 && one.size() == 10 && one.front() - one.back() > 1.0 && train_diff < kSpTolerance &&
         val_diff < kSpTolerance;
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
  CHECK(ok == 1);  // every rank fails with rank 0
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove_all(dir);
}

// runtime.overlap_comm (core/zero3.h, "Streams"): the per-layer collectives on a comm stream with
// events give bitwise the losses, gradient norms and validation losses of the one-stream path, at
// ZeRO 2 and 3, over NCCL (real overlap) and staged MPI (host waits), with 2 micro-batches per
// step (the shards accumulate across them) and an evaluation (stage 3 gathers outside a step).
// stages: 2 and 3 by default; 0 and 1 run OverlappedGradientAllReduce (core/zero.h) instead.
void check_overlap_bitwise(const fs::path& dir, const std::vector<std::string>& extra, MPI_Comm comm,
                           const std::string& tag, const std::vector<int>& stages = {2, 3}) {
  for (int stage : stages) {
    CAPTURE(stage);
    CAPTURE(tag);
    std::string name[2];
    for (int overlap : {0, 1}) {
      name[overlap] = tag + "_zero" + std::to_string(stage) + (overlap ? "_overlap" : "_plain");
      std::vector<std::string> sets = {"runtime.device=cuda", "parallel.zero_stage=" + std::to_string(stage),
                                       "runtime.overlap_comm=" + std::string(overlap ? "true" : "false"),
                                       "train.max_steps=6",
                                       metrics_of(dir, name[overlap])};
      sets.insert(sets.end(), extra.begin(), extra.end());
      REQUIRE(train(small_config(dir, sets), comm) == 0);
    }
    const fs::path plain = dir / (name[0] + ".jsonl"), overlap = dir / (name[1] + ".jsonl");
    const auto losses = field_values(overlap, "loss");
    REQUIRE(losses.size() == 6);
    for (double l : numbers(losses)) CHECK(std::isfinite(l));
    CHECK(numbers(losses).front() - numbers(losses).back() > 0.1);  // it trains
    CHECK(losses == field_values(plain, "loss"));
    CHECK(field_values(overlap, "grad_norm") == field_values(plain, "grad_norm"));
    CHECK(!field_values(overlap, "val_loss").empty());
    CHECK(field_values(overlap, "val_loss") == field_values(plain, "val_loss"));
  }
}

TEST_CASE("ZeRO 2 and 3 with runtime.overlap_comm give bitwise the losses without it (1 rank)", "[one_rank]") {
  const fs::path dir = job_dir("overlap");
  write_text_shards(dir);
  // 2 micro-batches of 8 x 128 tokens per step
  check_overlap_bitwise(dir, {"parallel.backend=nccl", "train.global_batch_tokens=2048"}, MPI_COMM_WORLD, "nccl");
  check_overlap_bitwise(dir, {"parallel.backend=mpi", "train.global_batch_tokens=2048"}, MPI_COMM_WORLD, "mpi");
  fs::remove_all(dir);
}

TEST_CASE("ZeRO 2 and 3 with runtime.overlap_comm on 4 ranks (SP 2 x DP 2, staged MPI) are bitwise without it",
          "[four_ranks]") {
  if (world_size() != 4) {
    WARN("needs mpirun -np 4; skipped");
    return;
  }
  const fs::path dir = job_dir("overlap4");
  write_text_shards(dir);
  // W = 4: real shards with padding; the ranks share a GPU, so staged MPI (NCCL refuses that)
  // 2 micro-batches: 2 DP groups x 8 x 128 tokens each
  check_overlap_bitwise(dir, {"parallel.sequence=2", "parallel.backend=mpi", "train.global_batch_tokens=4096"},
                        MPI_COMM_WORLD, "sp2dp2");
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove_all(dir);
}

// ZeRO 0 and 1 with runtime.overlap_comm (core/zero.h, OverlappedGradientAllReduce): each layer's
// gradients all-reduced on a comm stream during the last micro-batch's backward, the rest after:
// every element summed once, as by the whole-buffer all-reduce, so bitwise the losses, norms and
// validation losses without it (2 micro-batches per step: the first must not reduce).
TEST_CASE("ZeRO 0 and 1 with runtime.overlap_comm give bitwise the losses without it (1 rank)", "[one_rank]") {
  const fs::path dir = job_dir("overlap01");
  write_text_shards(dir);
  check_overlap_bitwise(dir, {"parallel.backend=nccl", "train.global_batch_tokens=2048"}, MPI_COMM_WORLD, "nccl",
                        {0, 1});
  check_overlap_bitwise(dir, {"parallel.backend=mpi", "train.global_batch_tokens=2048"}, MPI_COMM_WORLD, "mpi",
                        {0, 1});
  fs::remove_all(dir);
}

TEST_CASE("ZeRO 0 and 1 with runtime.overlap_comm on 2 ranks (DP 2, staged MPI) are bitwise without it",
          "[four_ranks]") {
  if (world_size() != 4) {
    WARN("needs mpirun -np 4; skipped");
    return;
  }
  const fs::path dir = job_dir("overlap01_dp2");
  write_text_shards(dir);
  // ranks 0 and 1 only: with 2 ranks every element's sum is one addition, a + b == b + a, so the
  // per-layer all-reduces match the whole-buffer one bitwise whatever algorithm MPI picks per
  // size (with 4 its summation order may differ between sizes). Ranks 2, 3 wait.
  MPI_Comm pair = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() < 2 ? 0 : MPI_UNDEFINED, world_rank(), &pair);
  int ok = 1;
  if (pair != MPI_COMM_NULL) {
    try {  // a failed REQUIRE must still reach the barrier below (Catch has recorded it)
      // 2 micro-batches: 2 DP ranks x 8 x 128 tokens each
      check_overlap_bitwise(dir, {"parallel.backend=mpi", "train.global_batch_tokens=4096"}, pair, "dp2", {0, 1});
    } catch (...) {
      ok = 0;
    }
    MPI_Comm_free(&pair);
  }
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  CHECK(all_ok == 1);  // every rank fails with ranks 0, 1
  if (world_rank() == 0) fs::remove_all(dir);
}

// runtime.all_to_all_chunks (comm/ulysses.h): SP = 4 on 4 ranks sharing the GPU (staged MPI, so
// each chunk's exchange blocks the host: correct, no overlap) with the all-to-alls in 4 chunks per
// sequence: every loss within kSpTolerance of the whole all-to-alls (cuBLASLt may pick other
// kernels for the qkv and attproj GEMMs on 8-row chunks instead of all 8 x 32 local rows), and a
// repeat bitwise the same (losses and validation losses).
TEST_CASE("SP=4 with runtime.all_to_all_chunks=4 on 4 ranks: the losses of 1 chunk, bitwise on repeat",
          "[four_ranks]") {
  if (world_size() != 4) {
    WARN("needs mpirun -np 4; skipped");
    return;
  }
  const fs::path dir = job_dir("chunks4");
  write_text_shards(dir);
  const char* names[3] = {"k1", "k4", "k4_again"};
  const char* chunks[3] = {"1", "4", "4"};
  for (int i = 0; i < 3; ++i)
    REQUIRE(train(small_config(dir, {"runtime.device=cuda", "parallel.sequence=4", "parallel.backend=mpi",
                                     "train.max_steps=4", "train.eval_interval=2",
                                     std::string("runtime.all_to_all_chunks=") + chunks[i],
                                     metrics_of(dir, names[i])})) == 0);
  int ok = 1;
  if (world_rank() == 0) {
    const auto k1 = field_values(dir / "k1.jsonl", "loss"), k4 = field_values(dir / "k4.jsonl", "loss");
    const double diff = max_relative_difference(numbers(k4), numbers(k1));
    std::printf("test_cuda_train: all_to_all_chunks 4 vs 1 (SP=4, staged MPI): max relative loss difference %.3g "
                "(tolerance %.3g)\n", diff, kSpTolerance);
    CHECK(k1.size() == 4);
    CHECK(diff < kSpTolerance);
    CHECK(k4 == field_values(dir / "k4_again.jsonl", "loss"));
    CHECK(!field_values(dir / "k4.jsonl", "val_loss").empty());
    CHECK(field_values(dir / "k4.jsonl", "val_loss") == field_values(dir / "k4_again.jsonl", "val_loss"));
    ok = k1.size() == 4 && diff < kSpTolerance && k4 == field_values(dir / "k4_again.jsonl", "loss");
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
  CHECK(ok == 1);
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove_all(dir);
}

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  int devices = cuda_device_count(), fewest = 0;
  MPI_Allreduce(&devices, &fewest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (fewest == 0) {
    if (mpi.world_rank == 0) std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  int result = 0;
  try {
    result = Catch::Session().run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_cuda_train: rank %d: %s\n", mpi.world_rank, e.what());
    mpi.abort(1);
  }
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
