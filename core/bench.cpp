// `ulysses bench` (see core/bench.h). Forward time is measured by a forward-only pass (forward
// + LM head + loss); backward = (forward + backward) - forward, since the training step fuses
// the LM head's backward into its forward chunks.
#include "core/bench.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "comm/groups.h"
#include "comm/ulysses.h"
#include "core/error.h"
#include "core/gpt.h"
#include "core/metrics.h"
#include "core/optimizer.h"

namespace ulysses {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
}  // namespace

int run_bench(const Config& cfg, MpiRuntime& mpi, const BenchOptions& opts) {
  validate_for_world(cfg, mpi.world_size);
  if (cfg.runtime.device == "cuda")
    throw_user_error("runtime.device: cuda: the model's CUDA path is not wired into the trainer yet; bench the CPU");
  if (cfg.runtime.threads > 0) {
    omp_set_num_threads(cfg.runtime.threads);
  } else {
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    omp_set_num_threads(std::max(1, cores / std::max(1, mpi.local_size)));
  }
  ProcessGroups groups = make_process_groups(cfg.parallel.sequence, CommBackend::mpi);
  const int P = groups.sp_size, B = cfg.train.micro_batch_size, N = cfg.train.seq_len, T = N / P;
  GPT model(cfg.model, {B, N, P, cfg.runtime.tile_tokens}, Device::cpu, groups.sequence.get());
  model.init_weights(cfg.train.seed);
  AdamW opt(cfg.train, model.shape(), Device::cpu);
  const int64_t n_params = num_parameters(model.shape());

  // synthetic tokens, the same sequence on every rank of an SP group
  std::mt19937 rng(uint32_t(cfg.train.seed + groups.dp_rank));
  const size_t BT = size_t(B) * size_t(T);
  std::vector<int32_t> tok(BT), tgt(BT), pos(BT);
  for (size_t i = 0; i < BT; ++i) {
    tok[i] = int32_t(rng() % uint32_t(cfg.model.vocab_size));
    tgt[i] = int32_t(rng() % uint32_t(cfg.model.vocab_size));
    pos[i] = int32_t(groups.sp_rank * T + int(i % size_t(T)));
  }

  std::vector<double> fwd, fwdbwd, allreduce, optim, total;
  uint64_t a2a_bytes = 0;
  for (int it = 0; it < opts.warmup + opts.repeat; ++it) {
    groups.world->barrier();
    int64_t count = 0;
    auto t0 = Clock::now();
    model.forward_loss(tok.data(), tgt.data(), pos.data(), &count);
    const double f = ms_since(t0);
    groups.world->barrier();
    if (groups.sequence) groups.sequence->counters().reset();
    const auto step0 = Clock::now();
    model.zero_grad();
    model.forward_backward(tok.data(), tgt.data(), pos.data(), &count);
    const double fb = ms_since(step0);
    if (groups.sequence) a2a_bytes = groups.sequence->counters().bytes_sent[size_t(Collective::all_to_all)];
    t0 = Clock::now();
    groups.world->all_reduce(model.grads_flat().data, model.grads_flat().data, size_t(n_params), DType::f32,
                             ReduceOp::sum);
    const double ar = ms_since(t0);
    t0 = Clock::now();
    opt.update(model.context(), model.params_flat(), model.grads_flat(), 1e-4f, 1.f / float(B * N), it + 1);
    const double op = ms_since(t0);
    const double tot = ms_since(step0);
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
  groups.world->all_reduce(med, med, 5, DType::f64, ReduceOp::max);
  const double step_s = med[4] / 1000.0;
  const double tokens = double(B) * N * groups.dp_size;
  const double tflops = double(flops_per_token(model.shape(), N, true)) * tokens / mpi.world_size / step_s / 1e12;
  uint64_t formula = 0;
  if (const UlyssesAllToAll* u = model.ulysses())
    formula = uint64_t(cfg.model.n_layer) * ulysses_layer_bytes_sent(u->plan(), groups.sp_rank, B, T, cfg.model.head_dim(), 4);

  spdlog::info("bench: {} layers, {} wide, {} heads, {:.1f}M parameters; B={} N={} P={} DP={}; {} threads/rank; "
               "median of {} after {} warm-up",
               cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, double(n_params) / 1e6, B, N, P, groups.dp_size,
               omp_get_max_threads(), opts.repeat, opts.warmup);
  spdlog::info("  forward {:9.2f} ms | backward {:9.2f} ms | grad all-reduce {:8.2f} ms | optimizer {:8.2f} ms",
               med[0], med[1] - med[0], med[2], med[3]);
  spdlog::info("  step    {:9.2f} ms | {:.0f} tokens/s | {:.4f} TFLOP/s per rank | peak RSS {:.2f} GiB", med[4],
               tokens / step_s, tflops, peak_rss_gib());
  if (P > 1)
    spdlog::info("  all-to-all bytes sent per step by rank 0: {} (formula {}: {})", a2a_bytes, formula,
                 a2a_bytes == formula ? "equal" : "DIFFERENT");
  if (!opts.csv.empty() && mpi.world_rank == 0) {
    const bool fresh = !std::filesystem::exists(opts.csv);
    std::FILE* f = std::fopen(opts.csv.c_str(), "a");
    if (!f) throw_user_error("--csv '{}': cannot open for appending", opts.csv);
    if (fresh)
      std::fprintf(f, "layers,width,heads,B,N,P,DP,forward_ms,backward_ms,allreduce_ms,optimizer_ms,step_ms,"
                      "tokens_per_second,tflops_per_rank,all_to_all_bytes\n");
    std::fprintf(f, "%d,%d,%d,%d,%d,%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.1f,%.6f,%llu\n", cfg.model.n_layer,
                 cfg.model.n_embd, cfg.model.n_head, B, N, P, groups.dp_size, med[0], med[1] - med[0], med[2], med[3],
                 med[4], tokens / step_s, tflops, (unsigned long long)a2a_bytes);
    std::fclose(f);
  }
  return 0;
}

}  // namespace ulysses
