// `ulysses bench` (see core/bench.h). Forward time is measured by a forward-only pass (forward
// + LM head + loss); backward = (forward + backward) - forward, since the training step fuses
// the LM head's backward into its forward chunks. On cuda each phase ends with
// ops::synchronize(ctx) before the clock is read (NCCL and the kernels return once enqueued).
#include "core/bench.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "comm/groups.h"
#include "comm/ulysses.h"
#include "core/emulate.h"
#include "core/base/error.h"
#include "core/gpt.h"
#include "core/metrics.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#endif

namespace ulysses {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The name of the CUDA device this rank uses ("" on cpu).
std::string gpu_name(const DevicePlan& plan) {
#ifdef ULYSSES_CUDA
  if (plan.device == Device::cuda) {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, plan.cuda_device));
    return prop.name;
  }
#endif
  (void)plan;
  return "";
}

// Device memory in use on this rank's GPU, in GiB: cudaMemGetInfo's total - free. It counts all
// of the GPU's memory in use (this process's CUDA context, arenas, cuBLASLt / cuDNN workspaces,
// NCCL buffers, the stream-ordered pool's reserve, and other processes on the same GPU), i.e.
// what nvidia-smi shows, not only the arenas. 0 on cpu.
double gpu_memory_used_gib(Device device) {
#ifdef ULYSSES_CUDA
  if (device == Device::cuda) {
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return double(total_bytes - free_bytes) / double(1ull << 30);
  }
#endif
  (void)device;
  return 0;
}

// The CSV columns of one bench row (the header line, without the newline).
constexpr const char* kCsvHeader =
    "layers,width,heads,B,N,P,DP,forward_ms,backward_ms,allreduce_ms,optimizer_ms,step_ms,"
    "tokens_per_second,tflops_per_rank,all_to_all_bytes,vocab,emulated,recompute,tile_tokens,"
    "flops_per_rank_step,activation_bytes,peak_rss_gib,threads,device,gpu,peak_tflops,mfu,peak_gpu_gib";

// true when `path` is absent or empty (the header is to be written); false when it holds rows
// under this version's header; UserError naming --csv when its header differs (appending would
// shift the columns).
bool csv_is_new(const std::string& path) {
  if (!std::filesystem::exists(path) || std::filesystem::file_size(path) == 0) return true;
  std::FILE* in = std::fopen(path.c_str(), "r");
  if (!in) throw_user_error("--csv '{}': cannot open for reading", path);
  std::string header;
  for (int c = std::fgetc(in); c != EOF && c != '\n'; c = std::fgetc(in)) header += char(c);
  std::fclose(in);
  if (header != kCsvHeader)
    throw_user_error("--csv '{}': the file's header has other columns than this ulysses bench writes (a file "
                     "from an older version?); give another file", path);
  return false;
}
}  // namespace

double peak_bf16_tflops(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("NVL")) return 0;  // H100 NVL / H200 NVL: other clocks and power, not in the table
  if (has("H100")) return has("PCIe") ? 756.5 : 989.4;
  if (has("H200")) return 989.4;
  if (has("A100")) return 312.0;
  return 0;
}

namespace {

// The medians over the timed steps of one rank, then the slowest rank's (ms), and what one step
// counted.
struct BenchTimes {
  double forward = 0, forward_backward = 0, all_reduce = 0, optimizer = 0, step = 0;
  uint64_t all_to_all_bytes = 0, step_flops = 0;
  double peak_gpu_gib = 0;
};

// Synthetic tokens, the same sequence on every rank of an SP group: [B, T] tokens, targets and
// the positions of this rank's share.
struct BenchBatch {
  std::vector<int32_t> tok, tgt, pos;
  BenchBatch(const Config& cfg, int B, int T, int sp_rank, int dp_rank) {
    std::mt19937 rng(uint32_t(cfg.train.seed + dp_rank));
    const size_t BT = size_t(B) * size_t(T);
    tok.resize(BT), tgt.resize(BT), pos.resize(BT);
    for (size_t i = 0; i < BT; ++i) {
      tok[i] = int32_t(rng() % uint32_t(cfg.model.vocab_size));
      tgt[i] = int32_t(rng() % uint32_t(cfg.model.vocab_size));
      pos[i] = int32_t(sp_rank * T + int(i % size_t(T)));
    }
  }
};

// warmup + repeat steps of: a forward-only pass, then the training step (zero_grad, forward +
// backward, the gradient all-reduce, AdamW), each phase timed after the device is idle.
BenchTimes time_steps(const BenchOptions& opts, GPT& model, AdamW& opt, ProcessGroups& groups, Communicator* seq,
                      const BenchBatch& in) {
  ops::Context& ctx = model.context();
  Communicator& host = groups.host_world();
  const int64_t n_params = num_parameters(model.shape());
  const GPTRunShape& r = model.run_shape();
  std::vector<double> fwd, fwdbwd, allreduce, optim, total;
  BenchTimes t;
  // Peak GPU memory: gpu_memory_used_gib sampled after every phase, once the device is idle (the
  // arenas are allocated up front and the ops' scratch only grows, in the first step, so nothing
  // allocated inside a phase is freed before its end except the scratch buffer a growth replaces).
  t.peak_gpu_gib = gpu_memory_used_gib(model.device());
  auto note_gpu_memory = [&] { t.peak_gpu_gib = std::max(t.peak_gpu_gib, gpu_memory_used_gib(model.device())); };
  // every rank's device idle, then all ranks together (host barrier)
  auto line_up = [&] {
    ops::synchronize(ctx);
    host.barrier();
  };
  for (int it = 0; it < opts.warmup + opts.repeat; ++it) {
    line_up();
    int64_t count = 0;
    auto t0 = Clock::now();
    model.forward_loss(in.tok.data(), in.tgt.data(), in.pos.data(), &count);
    ops::synchronize(ctx);
    const double f = ms_since(t0);
    note_gpu_memory();
    line_up();
    if (seq) seq->counters().reset();
    model.op_counts() = OpCounts{};
    const auto step0 = Clock::now();
    model.zero_grad();
    model.forward_backward(in.tok.data(), in.tgt.data(), in.pos.data(), &count);
    ops::synchronize(ctx);
    const double fb = ms_since(step0);
    note_gpu_memory();
    if (seq) t.all_to_all_bytes = seq->counters().bytes_sent[size_t(Collective::all_to_all)];
    t.step_flops = model.op_counts().flops();
    t0 = Clock::now();
    groups.world->all_reduce(model.grads_flat().data, model.grads_flat().data, size_t(n_params), DType::f32,
                             ReduceOp::sum);
    ops::synchronize(ctx);
    const double ar = ms_since(t0);
    t0 = Clock::now();
    opt.update(ctx, model.params_flat(), model.grads_flat(), 1e-4f, 1.f / float(r.B * r.N), it + 1,
               model.compute_params_padded().rows(0, n_params));
    ops::synchronize(ctx);
    const double op = ms_since(t0);
    const double tot = ms_since(step0);
    note_gpu_memory();
    if (it >= opts.warmup) {
      fwd.push_back(f);
      fwdbwd.push_back(fb);
      allreduce.push_back(ar);
      optim.push_back(op);
      total.push_back(tot);
    }
  }
  // the slowest rank sets the pace
  double med[5] = {median(fwd), median(fwdbwd), median(allreduce), median(optim), median(total)};
  host.all_reduce(med, med, 5, DType::f64, ReduceOp::max);
  host.all_reduce(&t.peak_gpu_gib, &t.peak_gpu_gib, 1, DType::f64, ReduceOp::max);  // the fullest GPU
  t.forward = med[0], t.forward_backward = med[1], t.all_reduce = med[2], t.optimizer = med[3], t.step = med[4];
  return t;
}

// The all-to-all bytes rank `sp_rank` must send per step by the formula (comm/ulysses.h), to
// compare with the communicator's counters: 0 at P = 1.
uint64_t all_to_all_formula(const Config& cfg, GPT& model, int sp_rank) {
  const UlyssesAllToAll* u = model.ulysses();
  if (!u) return 0;
  const UlyssesHeadPlan& plan = u->plan();
  const GPTRunShape& r = model.run_shape();
  const int B = r.B, T = r.T(), P = r.P;
  const int d = cfg.model.head_dim();
  const int elem = model.device() == Device::cuda ? 2 : 4;  // activations: bf16 on cuda, fp32 on cpu
  uint64_t formula = uint64_t(cfg.model.n_layer) * ulysses_layer_bytes_sent(plan, sp_rank, B, T, d, elem);
  if (r.recompute == Recompute::full) {
    // backward re-runs each layer's forward, its two all-to-alls included
    uint64_t forward = 0;
    for (int p = 0; p < P; ++p)
      if (p != sp_rank)
        forward += uint64_t(B) * T * d * uint64_t(elem) *
                   uint64_t(plan.qkv_offsets[p + 1] - plan.qkv_offsets[p] + plan.q_count[sp_rank]);
    formula += uint64_t(cfg.model.n_layer) * forward;
  }
  return formula;
}

// What a bench row reports besides the times.
struct BenchRow {
  int P = 1, DP = 1;
  bool emulated = false;
  double tokens = 0, tflops = 0, peak = 0, mfu = 0;
  std::string gpu;
};

void print_bench(const Config& cfg, const BenchOptions& opts, GPT& model, const DevicePlan& plan, const BenchTimes& t,
                 const BenchRow& row, uint64_t formula) {
  const GPTRunShape& r = model.run_shape();
  const double step_s = t.step / 1000.0;
  spdlog::info("bench: {} layers, {} wide, {} heads, {:.1f}M parameters; B={} N={} P={}{} DP={}; recompute {}, "
               "tile_tokens {}; {} threads/rank; median of {} after {} warm-up",
               cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, double(num_parameters(model.shape())) / 1e6,
               r.B, r.N, row.P, row.emulated ? " (emulated on one rank)" : "", row.DP, cfg.runtime.recompute,
               cfg.runtime.tile_tokens, omp_get_max_threads(), opts.repeat, opts.warmup);
  spdlog::info("  forward {:9.2f} ms | backward {:9.2f} ms | grad all-reduce {:8.2f} ms | optimizer {:8.2f} ms",
               t.forward, t.forward_backward - t.forward, t.all_reduce, t.optimizer);
  spdlog::info("  step    {:9.2f} ms | {:.0f} tokens/s | {:.4f} TFLOP/s per rank | peak RSS {:.2f} GiB", t.step,
               row.tokens / step_s, row.tflops, peak_rss_gib());
  if (plan.device == Device::cuda) {
    spdlog::info("  device  {} (cuda:{}), backend {} | MFU {} (peak bf16 dense {})", row.gpu, plan.cuda_device,
                 comm_backend_name(plan.backend), row.peak > 0 ? fmt::format("{:.1f}%", 100 * row.mfu) : "n/a",
                 row.peak > 0 ? fmt::format("{:.1f} TFLOP/s", row.peak) : "unknown for this GPU");
    spdlog::info("  peak GPU memory {:.2f} GiB (cudaMemGetInfo total - free after each phase, the fullest rank's "
                 "GPU; the whole GPU's use: the CUDA context and other ranks sharing it included)",
                 t.peak_gpu_gib);
  }
  spdlog::info("  activations {:.3f} GiB; model FLOPs counted per step on this rank {:.4e} (formula {:.4e})",
               double(model.activation_bytes()) / (1ull << 30), double(t.step_flops),
               double(flops_per_token(model.shape(), r.N, true)) * r.B * r.T());
  if (row.P > 1)
    spdlog::info("  all-to-all bytes sent per step by rank 0: {} (formula {}: {})", t.all_to_all_bytes, formula,
                 t.all_to_all_bytes == formula ? "equal" : "DIFFERENT");
}

// One row of --csv (kCsvHeader's columns), appended; the header first when the file is new.
void append_csv(const std::string& path, const Config& cfg, GPT& model, const BenchTimes& t, const BenchRow& row) {
  const GPTRunShape& r = model.run_shape();
  const Device device = model.device();
  const bool fresh = csv_is_new(path);
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f) throw_user_error("--csv '{}': cannot open for appending", path);
  if (fresh) std::fprintf(f, "%s\n", kCsvHeader);
  // peak_gpu_gib: empty on cpu (not measured)
  const std::string gpu_gib = device == Device::cuda ? fmt::format("{:.3f}", t.peak_gpu_gib) : "";
  std::fprintf(f, "%d,%d,%d,%d,%d,%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.1f,%.6f,%llu,%d,%d,%s,%d,%llu,%zu,%.4f,%d,%s,%s,%.1f,%.4f,%s\n",
               cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, r.B, r.N, row.P, row.DP, t.forward,
               t.forward_backward - t.forward, t.all_reduce, t.optimizer, t.step, row.tokens / (t.step / 1000.0),
               row.tflops, (unsigned long long)t.all_to_all_bytes, cfg.model.vocab_size, row.emulated ? 1 : 0,
               cfg.runtime.recompute.c_str(), cfg.runtime.tile_tokens, (unsigned long long)t.step_flops,
               model.activation_bytes(), peak_rss_gib(), omp_get_max_threads(), device_name(device), row.gpu.c_str(),
               row.peak, row.mfu, gpu_gib.c_str());
  std::fclose(f);
}

}  // namespace

int run_bench(const Config& cfg, MpiRuntime& mpi, const BenchOptions& opts) {
  validate_for_world(cfg, mpi.world_size);
  if (!opts.csv.empty() && mpi.world_rank == 0) csv_is_new(opts.csv);  // a mismatched file fails now, not after timing
  const DevicePlan plan = setup_devices(cfg.runtime.device, cfg.parallel.backend, mpi);
  const Device device = plan.device;
  start_rank(cfg, plan, mpi);  // threads, and the start-up warnings (core/trainer.h)
  order_nccl_launches(plan.backend == CommBackend::nccl &&
                      (cfg.runtime.overlap_comm || cfg.runtime.all_to_all_chunks > 1));
  ProcessGroups groups = make_process_groups(cfg.parallel.sequence, plan.backend, device, mpi.comm);
  // parallel.emulate_sequence = P: this rank does rank 0's work of a P-rank group, the all-to-alls
  // as local copies of the same size (core/emulate.h)
  BenchRow row;
  row.emulated = cfg.parallel.emulate_sequence > 1;
  row.P = row.emulated ? cfg.parallel.emulate_sequence : groups.sp_size;
  row.DP = groups.dp_size;
  const int P = row.P;
  const int sp_rank = row.emulated ? 0 : groups.sp_rank;
  const int B = cfg.train.micro_batch_size, N = cfg.train.seq_len, T = N / P;
  std::unique_ptr<Communicator> emulated_seq;
  if (row.emulated) emulated_seq = std::make_unique<EmulatedSequenceCommunicator>(P, 0, device);
  Communicator* seq = row.emulated ? emulated_seq.get() : groups.sequence.get();
  GPTRunShape run{B, N, P, cfg.runtime.tile_tokens, parse_recompute(cfg.runtime.recompute)};
  run.offload_checkpoints = cfg.runtime.offload == "checkpoints";  // config: needs recompute full, cuda
  run.all_to_all_chunks = cfg.runtime.all_to_all_chunks;  // comm/ulysses.h; no effect at P = 1
  GPT model(cfg.model, run, device, seq);
  model.context().cudnn_attention = uses_cudnn_attention(cfg);  // runtime.attention
  groups.set_stream(model.context().stream());
  model.init_weights(cfg.train.seed);
  model.refresh_compute_params();
  AdamW opt(cfg.train, model.shape(), device);

  const BenchTimes t = time_steps(opts, model, opt, groups, seq, BenchBatch(cfg, B, T, sp_rank, groups.dp_rank));
  // tokens of the whole job per step (emulated: of the P-rank group this rank stands for) and
  // FLOPs of one rank per second
  row.tokens = row.emulated ? double(B) * N : double(B) * N * groups.dp_size;
  const int ranks = row.emulated ? P : mpi.world_size;
  row.tflops = double(flops_per_token(model.shape(), N, true)) * row.tokens / ranks / (t.step / 1000.0) / 1e12;
  // MFU against the GPU's dense bf16 peak (core/bench.h); one GPU per rank assumed (ranks that
  // share a GPU each report their own share)
  row.gpu = gpu_name(plan);
  row.peak = peak_bf16_tflops(row.gpu);
  row.mfu = row.peak > 0 ? row.tflops / row.peak : 0;
  print_bench(cfg, opts, model, plan, t, row, all_to_all_formula(cfg, model, sp_rank));
  if (!opts.csv.empty() && mpi.world_rank == 0) append_csv(opts.csv, cfg, model, t, row);
  return 0;
}

}  // namespace ulysses
