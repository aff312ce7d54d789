// The training loop (see core/trainer.h; the phases and the files that hold them: core/train_run.h).
// One optimizer step:
//   for each of `accum` micro-batches: forward, fused LM head + loss, backward (grads accumulate
//   as the gradient of the summed loss over this rank's tokens)
//   all-reduce(sum) the gradients and the loss / token counts over the whole DP × SP world (ZeRO
//   2, 3: each layer's gradient is reduce-scattered into shards during backward, core/zero3.h)
//   grad_norm = |g| / tokens; clip; AdamW with grad_scale = clip / tokens
//
// On cuda (docs/gpu.md): parameters (fp32 master + bf16 compute copy), gradients, AdamW state and
// activations live on the GPU; the collectives on them go through NCCL or MPI staged through
// pinned host memory (comm/groups.h picks); small host values (loss sums, the stop vote, errors,
// checkpoint staging) go through an MPI communicator on host memory (ProcessGroups::host_world).
// The host waits for the device only where it must: the loss read (inside the model), the
// gradient norm (ops::sum_squares) and once at the end of the step for the step time.
#include "core/trainer.h"

#include <omp.h>

#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <thread>

#include <spdlog/spdlog.h>

#include "core/base/error.h"
#include "core/optimizer.h"
#include "core/train_run.h"

namespace ulysses {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::string format_duration(double seconds) {
  const int64_t s = int64_t(seconds + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60)
                   : fmt::format("{}:{:02d}", s / 60, s % 60);
}

// Forward and backward of the step's `accum` micro-batches; returns {loss sum, token count} over
// this rank's micro-batches.
std::array<double, 2> accumulate_gradients(TrainRun& run) {
  std::array<double, 2> sums = {0, 0};
  WatchedRegion region(run.watchdog, run.watch_regions, "forward/backward (NCCL all-to-alls)",
                       run.groups.sequence->name().c_str());
  for (int k = 0; k < run.accum; ++k) {
    run.train_data.next(run.tok.data(), run.tgt.data(), run.pos.data());
    int64_t count = 0;
    if (run.overlapped) run.overlapped->set_last_micro_batch(k == run.accum - 1);  // only its backward reduces
    sums[0] += run.model.forward_backward(run.tok.data(), run.tgt.data(), run.pos.data(), &count);  // reads the loss: waits
    sums[1] += double(count);
  }
  return sums;
}

// Testing aid (runtime.debug_inject_nan_step): a NaN in one rank's gradient must reach every
// rank through the all-reduce and make the step skip.
void inject_nan_if_asked(TrainRun& run, int step) {
  const RuntimeConfig& rt = run.cfg.runtime;
  if (rt.debug_inject_nan_step > 0 && step + 1 >= rt.debug_inject_nan_step &&
      step + 1 < rt.debug_inject_nan_step + rt.debug_inject_nan_steps && run.world().rank() == run.world().size() - 1) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    ops::copy(run.ctx(), run.model.grads_flat().rows(0, 1), host_tensor(&nan, 1));
    ops::synchronize(run.ctx());
  }
}

// Every rank holds the same parameters and saw different tokens: sum the gradients over DP × SP
// (all-reduce, or reduce-scatter into this rank's shard with ZeRO 2 / 3). Returns |sum|^2.
double reduce_gradients(TrainRun& run) {
  WatchedRegion region(run.watchdog, run.watch_regions, "gradient reduction (NCCL)", run.world().name().c_str());
  return run.per_layer ? run.layer_zero->reduce_gradients()
                       : run.optimizer->reduce_gradients(run.ctx(), run.model.grads_padded(),
                                                         run.overlapped ? &*run.overlapped : nullptr);  // the norm's read waits
}

// AdamW on the summed gradients, scaled by clip / tokens.
void apply_update(TrainRun& run, int step, double lr, double clip, double tokens) {
  WatchedRegion region(run.watchdog, run.watch_regions, "optimizer step (NCCL all-gather)", run.world().name().c_str());
  if (run.per_layer) {
    run.layer_zero->update(float(lr), float(clip / tokens), step + 1);
  } else {
    run.optimizer->update(run.ctx(), run.model.params_padded(), run.model.grads_padded(), float(lr),
                          float(clip / tokens), step + 1, run.model.compute_params_padded());
    // ZeRO 1 all-gathered master weights: the other shards' compute copy is stale (core/zero.h)
    if (run.optimizer->stage() >= 1) run.model.refresh_compute_params();
  }
  ops::synchronize(run.ctx());  // the step time covers the device work (no-op on cpu)
}

// Mean validation loss over eval_steps micro-batches from the start of the split.
double evaluate(TrainRun& run) {
  DataLoader& val = *run.val_data;
  val.reset();
  double sums[2] = {0, 0};  // loss sum, token count
  for (int i = 0; i < run.cfg.train.eval_steps; ++i) {
    val.next(run.tok.data(), run.tgt.data(), run.pos.data());
    int64_t count = 0;
    sums[0] += run.model.forward_loss(run.tok.data(), run.tgt.data(), run.pos.data(), &count);
    sums[1] += double(count);
  }
  run.host().all_reduce(sums, sums, 2, DType::f64, ReduceOp::sum);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

}  // namespace

StepMetrics train_step(TrainRun& run, int step) {
  const auto t0 = Clock::now();
  run.watchdog.set_step(step + 1);
  for (Communicator* c : {run.groups.world.get(), run.groups.sequence.get(), run.groups.host.get()})
    if (c) c->counters().reset();
  run.model.zero_grad();
  if (run.per_layer) run.layer_zero->zero_grad();

  std::array<double, 2> sums = accumulate_gradients(run);
  inject_nan_if_asked(run, step);
  const double grad_squares = reduce_gradients(run);
  run.host().all_reduce(sums.data(), sums.data(), 2, DType::f64, ReduceOp::sum);
  const double tokens = std::max(1.0, sums[1]);

  StepMetrics m;
  m.step = step + 1;
  m.loss = sums[0] / tokens;
  m.lr = learning_rate(run.cfg.train, step);
  m.grad_norm = std::sqrt(grad_squares) / tokens;
  m.tokens = run.tokens_per_step;
  if (!std::isfinite(m.loss) || !std::isfinite(m.grad_norm)) {
    m.skipped = true;
    run.state.skipped_in_a_row += 1;
    spdlog::warn("step {}: non-finite loss ({}) or gradient norm ({}): update skipped ({} in a row)", step + 1, m.loss,
                 m.grad_norm, run.state.skipped_in_a_row);
    if (run.state.skipped_in_a_row >= run.cfg.train.max_skipped_steps)
      throw AllRanksUserError(fmt::format("{} consecutive steps had a non-finite loss or gradient norm (train.max_skipped_steps"
                                          " = {}); stopping. The last checkpoint (if any) is intact.",
                                          run.state.skipped_in_a_row, run.cfg.train.max_skipped_steps));
  } else {
    run.state.skipped_in_a_row = 0;
    const double clip_to = run.cfg.train.grad_clip;
    const double clip = clip_to > 0 && m.grad_norm > clip_to ? clip_to / m.grad_norm : 1.0;
    apply_update(run, step, m.lr, clip, tokens);
  }
  m.step_ms = ms_since(t0);
  m.tokens_per_second = double(run.tokens_per_step) / (m.step_ms / 1000.0);
  const int64_t flops_token = flops_per_token(run.shape, run.N, /*causal_halved=*/true);
  m.tflops_per_rank = double(flops_token) * double(run.tokens_per_step) / run.mpi.world_size / (m.step_ms / 1000.0) / 1e12;
  m.peak_memory_gib = peak_rss_gib();
  m.comm = run.groups.world->counters();
  for (Communicator* c : {run.groups.sequence.get(), run.groups.host.get()})
    if (c)
      for (size_t k = 0; k < m.comm.bytes_sent.size(); ++k) m.comm.bytes_sent[k] += c->counters().bytes_sent[k];
  return m;
}

void evaluate_if_due(TrainRun& run, int step, StepMetrics& m) {
  const TrainConfig& t = run.cfg.train;
  const bool last = step + 1 == t.max_steps;
  if (!run.val_data || t.eval_steps <= 0 || !((t.eval_interval > 0 && (step + 1) % t.eval_interval == 0) || last))
    return;
  WatchedRegion region(run.watchdog, run.watch_regions, "validation (NCCL all-to-alls)",
                       run.groups.sequence->name().c_str());
  m.val_loss = evaluate(run);
}

void report_step(TrainRun& run, int step, const StepMetrics& m, double eta_seconds) {
  if (run.metrics) run.metrics->write(m);
  const int max_steps = run.cfg.train.max_steps;
  if ((step + 1) % std::max(1, run.cfg.logging.interval) != 0 && step + 1 != max_steps) return;
  spdlog::info("step {:>5}/{} | loss {:.4f}{} | lr {:.2e} | norm {:.3f} | {:.1f} ms | {:.0f} tok/s | "
               "{:.3f} TFLOP/s/rank | {:.2f} GiB | ETA {}",
               step + 1, max_steps, m.loss, m.val_loss >= 0 ? fmt::format(" (val {:.4f})", m.val_loss) : "", m.lr,
               m.grad_norm, m.step_ms, m.tokens_per_second, m.tflops_per_rank, m.peak_memory_gib,
               format_duration(eta_seconds));
}

// Graceful stop: one all-reduce(max) so every rank stops after the same step, even when only one
// of them was signalled. The last step ends normally (finish_run).
bool stop_if_signalled(TrainRun& run, int step, bool saved) {
  const int signo = run.stop_signals.agree(run.host());
  const int max_steps = run.cfg.train.max_steps;
  if (signo == 0 || step + 1 == max_steps) return false;
  if (!saved) save_checkpoint(run, step + 1);
  if (run.host().rank() == 0 && run.cfg.checkpoint.dir.empty()) {
    spdlog::warn("{}: stopped after step {} of {}; no checkpoint was written (checkpoint.dir is not set), "
                 "so this run's progress is lost",
                 signal_name(signo), step + 1, max_steps);
  } else if (run.host().rank() == 0) {
    spdlog::warn("{}: stopped after step {} of {}; checkpoint {}/step_{:08d} written. To continue, rerun the "
                 "same command with --set checkpoint.resume=auto",
                 signal_name(signo), step + 1, max_steps, run.cfg.checkpoint.dir, step + 1);
  }
  return true;
}

void start_rank(const Config& cfg, const DevicePlan& plan, const MpiRuntime& mpi) {
  int threads = cfg.runtime.threads;
  if (threads <= 0) {
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    threads = std::max(1, cores / std::max(1, mpi.local_size));
  }
  omp_set_num_threads(threads);
  if (mpi.world_rank == 0)
    for (const std::string& note : inert_at_start(cfg, plan.device == Device::cuda,
                                                  plan.backend == CommBackend::nccl, mpi.world_size))
      spdlog::warn("config: {}", note);
}

// The run, phase by phase (core/train_run.h says which file holds each).
int run_train(const Config& cfg, MpiRuntime& mpi, const std::string& dump_path) {
  const DevicePlan plan = check_train_request(cfg, mpi, !dump_path.empty());
  TrainRun run(cfg, mpi, plan);
  load_initial_state(run);
  if (!dump_path.empty()) {
    dump_first_batch(run, dump_path);
    return 0;
  }
  log_run_summary(run);
  open_metrics(run);

  const int first_step = run.state.step, max_steps = cfg.train.max_steps;
  const auto run_start = Clock::now();
  for (int step = first_step; step < max_steps; ++step) {
    StepMetrics m = train_step(run, step);
    evaluate_if_due(run, step, m);
    const double elapsed = ms_since(run_start) / 1000.0;
    report_step(run, step, m, elapsed / (step + 1 - first_step) * (max_steps - step - 1));
    const bool last = step + 1 == max_steps;
    const bool saved = cfg.checkpoint.interval > 0 && (step + 1) % cfg.checkpoint.interval == 0 && !last;
    if (saved) save_checkpoint(run, step + 1);
    if (stop_if_signalled(run, step, saved)) return 0;
  }
  finish_run(run, first_step);
  return 0;
}

}  // namespace ulysses
