// What one `ulysses train` run holds, and its phases (internal to core/: the trainer's files
// share it; the public entry points are in core/trainer.h). run_train (core/trainer.cpp) reads
// top to bottom:
//
//   check_train_request   the request itself: the world size, dump's needs, the devices   train_setup.cpp
//   TrainRun(...)         set-up: signals, watchdog, groups, model, optimizer, data          train_setup.cpp
//   load_initial_state    resume a checkpoint, init_from GPT-2 weights, or init from the seed train_state.cpp
//   log_run_summary       the model, the layout and the memory per rank                      train_setup.cpp
//   for each step:
//     train_step          micro-batches, gradient reduction, clip, AdamW                     trainer.cpp
//     evaluate_if_due     the validation loss                                                trainer.cpp
//     report_step         metrics file and the log line                                      trainer.cpp
//     save_checkpoint     at checkpoint.interval                                             train_state.cpp
//     stop_if_signalled   SIGTERM / SIGUSR1 / SIGINT: save and stop together                 trainer.cpp
//   finish_run            the last checkpoint, the exports, the sample                       train_state.cpp
//
// `ulysses dump` (core/train_dump.cpp) is the same set-up and initial state followed by one
// forward + backward instead of the loop.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/bootstrap.h"
#include "comm/groups.h"
#include "comm/watchdog.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/data.h"
#include "core/gpt.h"
#include "core/metrics.h"
#include "core/signals.h"
#include "core/zero.h"
#include "core/zero3.h"

namespace ulysses {

// Everything a training run holds, built in this order by the constructor (the set-up phase)
// and destroyed in reverse: the signal handlers and the watchdog outlive the process groups,
// the groups outlive the model, and the overlapped all-reduce (which waits on its stream and
// removes its hooks) goes before the model.
struct TrainRun {
  TrainRun(const Config& cfg, MpiRuntime& mpi, const DevicePlan& plan);
  TrainRun(const TrainRun&) = delete;
  TrainRun& operator=(const TrainRun&) = delete;

  const Config& cfg;
  MpiRuntime& mpi;
  const DevicePlan plan;
  const Device device;

  // Reliability (docs/reliability.md): SIGTERM / SIGUSR1 / SIGINT stop the run cleanly at a step
  // boundary; every collective on the groups is timed by the watchdog, which aborts the job when
  // one takes longer than runtime.comm_timeout.
  StopSignals stop_signals;
  Watchdog watchdog;
  ProcessGroups groups;
  // NCCL collectives return once enqueued: the host waits on them inside watched regions
  const bool watch_regions;

  // the layout: P x DP ranks, micro-batches of B x N tokens (T = N / P per rank), `accum`
  // micro-batches per optimizer step
  const int P, DP, B, N, T, accum;
  const int64_t tokens_per_step;
  // ZeRO (core/zero.h, core/zero3.h): stages 2 and 3 work per layer (LayerShardedZero), 0 and 1
  // on the flat buffers (ZeroAdamW)
  const int zero_stage;
  const bool per_layer;

  GPT model;
  std::optional<ZeroAdamW> optimizer;         // ZeRO 0 / 1
  std::optional<LayerShardedZero> layer_zero;  // ZeRO 2 / 3
  // ZeRO 0 / 1 with runtime.overlap_comm: the last backward's per-layer all-reduces (core/zero.h)
  std::optional<OverlappedGradientAllReduce> overlapped;
  const GPTShape shape;
  const int64_t n_params;

  DataLoader train_data;
  std::unique_ptr<DataLoader> val_data;  // null without validation data

  TrainState state;
  std::optional<std::string> resume;      // the checkpoint resumed from, if any
  std::unique_ptr<MetricsWriter> metrics;  // logging.metrics_file (rank 0)
  // one micro-batch's host inputs, [B, T] each
  std::vector<int32_t> tok, tgt, pos;

  Communicator& world() { return *groups.world; }       // the model's memory: gradients, ZeRO
  Communicator& host() { return groups.host_world(); }  // host memory: sums, votes, errors, staging
  ops::Context& ctx() { return model.context(); }

  // The master weights as host memory for file I/O (ZeRO 0 and 1): on cpu the model's own
  // buffer, on cuda a host copy (staging) moved by download_params / upload_params.
  float* host_params();
  float* download_params();
  void upload_params(const float* p);
  std::vector<float> params_staging;
  // ZeRO 2 and 3: the whole parameters on rank 0, gathered from / scattered to the shards
  std::vector<float> params_whole;
};

// ---- the phases (see the top of this file) ------------------------------------------------------

// Checks what needs no groups yet (validate_for_world, dump's needs, emulation, the llm.c / HF
// layout), agrees on the devices and starts the rank (start_rank). Returns the device plan.
DevicePlan check_train_request(const Config& cfg, MpiRuntime& mpi, bool dump);
// Resumes (resolve_resume), imports checkpoint.init_from, or initialises from the seed; then
// the compute copy and the layout recorded in run.state.
void load_initial_state(TrainRun& run);
void log_run_summary(TrainRun& run);
// Opens logging.metrics_file on rank 0 (appending when resuming).
void open_metrics(TrainRun& run);
// One optimizer step (step is 0-based): loss, grad_norm, lr, the timing and comm counters.
StepMetrics train_step(TrainRun& run, int step);
void evaluate_if_due(TrainRun& run, int step, StepMetrics& m);
void report_step(TrainRun& run, int step, const StepMetrics& m, double eta_seconds);
// The whole parameters and AdamW state to checkpoint.dir (nothing when it is unset); collective.
void save_checkpoint(TrainRun& run, int step);
// After a step: if any rank was signalled, save (unless `saved`) and say how to continue. Returns
// true when the run stops here. Collective (one all-reduce of the pending signals).
bool stop_if_signalled(TrainRun& run, int step, bool saved);
// After the last step: the final checkpoint, checkpoint.export_llmc / export_hf, and the sample.
void finish_run(TrainRun& run, int first_step);

// Runs `fn` on world rank 0 only (file I/O that one rank does for everybody). A UserError there
// is broadcast and rethrown on every rank, so the job fails everywhere with the same message
// instead of leaving the other ranks waiting in the next collective.
void on_root(Communicator& world, const std::function<void()>& fn);
// A host buffer as a tensor, for ops::copy between the host and the model's device.
Tensor host_tensor(const float* p, int64_t n);

// `ulysses dump` (core/trainer.h): the first micro-batch's tokens, logits, loss and gradients.
void dump_first_batch(TrainRun& run, const std::string& path);
// train.sample_tokens tokens generated by a P = 1 copy of `trained`, decoded with data.tokenizer
// (core/train_sample.cpp).
std::string sample_text(const Config& cfg, GPT& trained, Device device);

}  // namespace ulysses
