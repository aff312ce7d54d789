// The training run's set-up (core/train_run.h): what is checked before anything is built, the
// TrainRun constructor (signals, watchdog, process groups, model, optimizer, data) and the
// start-up summary.
#include <omp.h>

#include <spdlog/spdlog.h>

#include "core/base/error.h"
#include "core/llmc.h"
#include "core/train_run.h"
#include "core/trainer.h"

namespace ulysses {

namespace {

// The model's run shape for this layout (ZeRO 2 / 3: the model stores no layer gradients (2) or
// no layer parameters and gradients (3), and on cuda keeps only its bf16 compute copy: the
// master weights are LayerShardedZero's shards).
GPTRunShape train_run_shape(const Config& cfg, int P, int world_size) {
  const bool per_layer = cfg.parallel.zero_stage >= 2;
  GPTRunShape run{cfg.train.micro_batch_size, cfg.train.seq_len, P, cfg.runtime.tile_tokens,
                  parse_recompute(cfg.runtime.recompute), world_size};
  run.sharded_layer_grads = per_layer;
  run.sharded_layer_params = cfg.parallel.zero_stage == 3;
  run.master_weights = !per_layer;
  run.offload_checkpoints = cfg.runtime.offload == "checkpoints";  // config: needs recompute full, cuda
  run.all_to_all_chunks = cfg.runtime.all_to_all_chunks;  // comm/ulysses.h; no effect at P = 1
  return run;
}

// The DP x SP process groups, each collective on them timed by the watchdog.
ProcessGroups make_watched_groups(const Config& cfg, const DevicePlan& plan, MpiRuntime& mpi, Watchdog& watchdog) {
  order_nccl_launches(plan.backend == CommBackend::nccl &&
                      (cfg.runtime.overlap_comm || cfg.runtime.all_to_all_chunks > 1));
  ProcessGroups groups = make_process_groups(cfg.parallel.sequence, plan.backend, plan.device, mpi.comm);
  watch_process_groups(groups, watchdog);
  return groups;
}

// micro-batches per optimizer step: train.global_batch_tokens over the tokens of one micro-step
int accumulation_steps(const Config& cfg, int DP) {
  const int64_t tokens_per_micro = int64_t(cfg.train.micro_batch_size) * cfg.train.seq_len * DP;
  return cfg.train.global_batch_tokens > 0 ? int(cfg.train.global_batch_tokens / tokens_per_micro) : 1;
}

}  // namespace

void on_root(Communicator& world, const std::function<void()>& fn) {
  std::string error;
  if (world.rank() == 0) {
    try {
      fn();
    } catch (const UserError& e) {
      error = e.what();
    }
  }
  int64_t len = int64_t(error.size());
  world.broadcast(&len, 1, DType::f64 /* an 8-byte word */, 0);
  if (len == 0) return;
  error.resize(size_t(len + 1) / 2 * 2);  // moved as 2-byte words
  world.broadcast(error.data(), error.size() / 2, DType::u16, 0);
  error.resize(size_t(len));
  throw AllRanksUserError(error);
}

Tensor host_tensor(const float* p, int64_t n) { return Tensor(const_cast<float*>(p), {n}, DType::f32, Device::cpu); }

DevicePlan check_train_request(const Config& cfg, MpiRuntime& mpi, bool dump) {
  validate_for_world(cfg, mpi.world_size);
  // (dump sums the gradients itself: the ZeRO 2 / 3 shards and the overlapped all-reduces would
  // have reduced them already)
  if (dump && (cfg.parallel.zero_stage >= 2 || mpi.world_size != cfg.parallel.sequence || cfg.runtime.overlap_comm))
    throw AllRanksUserError(fmt::format(
        "ulysses dump needs one data-parallel group (world size {} = parallel.sequence {}), parallel.zero_stage "
        "0 or 1 (it is {}) and runtime.overlap_comm false",
        mpi.world_size, cfg.parallel.sequence, cfg.parallel.zero_stage));
  // cpu or cuda, MPI or NCCL, agreed by every rank; the GPU picked by local rank (comm/groups.h)
  const DevicePlan plan = setup_devices(cfg.runtime.device, cfg.parallel.backend, mpi);
  start_rank(cfg, plan, mpi);
  // Refused before the groups are built (NCCL's set-up takes seconds); every rank decides alike
  // from the config and the agreed device, so the error is reported once, not per rank.
  if (cfg.parallel.emulate_sequence > 1)
    throw AllRanksUserError(fmt::format(
        "parallel.emulate_sequence = {}: emulation measures one rank's work of a P-rank run (its losses are not a "
        "real run's); use it with `ulysses bench` or `ulysses estimate`, not train",
        cfg.parallel.emulate_sequence));
  if (!cfg.checkpoint.export_llmc.empty() || !cfg.checkpoint.export_hf.empty() || !cfg.checkpoint.init_from.empty())
    llmc_header_for(cfg.model);  // fails now, not after training, when GPT-2's layout cannot hold this model
  return plan;
}

TrainRun::TrainRun(const Config& cfg_, MpiRuntime& mpi_, const DevicePlan& plan_)
    : cfg(cfg_),
      mpi(mpi_),
      plan(plan_),
      device(plan_.device),
      watchdog(mpi_.world_rank, cfg_.runtime.comm_timeout),
      groups(make_watched_groups(cfg_, plan_, mpi_, watchdog)),
      watch_regions(plan_.backend == CommBackend::nccl),
      P(groups.sp_size),
      DP(groups.dp_size),
      B(cfg_.train.micro_batch_size),
      N(cfg_.train.seq_len),
      T(N / P),
      accum(accumulation_steps(cfg_, DP)),
      tokens_per_step(int64_t(B) * N * DP * accum),
      zero_stage(cfg_.parallel.zero_stage),
      per_layer(zero_stage >= 2),
      model(cfg_.model, train_run_shape(cfg_, P, mpi_.world_size), device, groups.sequence.get()),
      shape(model.shape()),
      n_params(num_parameters(shape)),
      train_data(cfg_.data, "train", B, N, DataSlice{groups.sp_rank, P, groups.dp_rank, DP}, cfg_.train.seed,
                 cfg_.model.vocab_size),
      tok(size_t(B) * size_t(T)),
      tgt(size_t(B) * size_t(T)),
      pos(size_t(B) * size_t(T)) {
  model.context().cudnn_attention = uses_cudnn_attention(cfg);  // runtime.attention
  groups.set_stream(ctx().stream());  // every device collective runs in order with the model's kernels
  if (per_layer)
    layer_zero.emplace(cfg.train, model, zero_stage, world(), &host(), cfg.runtime.overlap_comm);
  else
    optimizer.emplace(cfg.train, shape, zero_stage, world(), device, &host());
  // (cuda; config checks) declared after the model, so destroyed before it
  if (!per_layer && cfg.runtime.overlap_comm) overlapped.emplace(model, world());
  if (cfg.data.source == "synthetic" || !cfg.data.val.empty())
    val_data = std::make_unique<DataLoader>(cfg.data, "val", B, N, DataSlice{groups.sp_rank, P, groups.dp_rank, DP},
                                            cfg.train.seed + 7, cfg.model.vocab_size);
  spdlog::info("data: train: {}", train_data.describe());
  spdlog::info("data: val: {}", val_data ? val_data->describe() : std::string("none (data.val is empty): no validation loss"));
}

float* TrainRun::host_params() {
  if (device == Device::cpu) return model.params_flat().f32();
  params_staging.resize(size_t(n_params));
  return params_staging.data();
}

float* TrainRun::download_params() {
  float* p = host_params();
  if (device != Device::cpu) {
    ops::copy(ctx(), host_tensor(p, n_params), model.params_flat());
    ops::synchronize(ctx());
  }
  return p;
}

void TrainRun::upload_params(const float* p) {
  if (device != Device::cpu) {
    ops::copy(ctx(), model.params_flat(), host_tensor(p, n_params));
    ops::synchronize(ctx());
    params_staging = {};
  }
}

void log_run_summary(TrainRun& run) {
  const Config& cfg = run.cfg;
  const DevicePlan& plan = run.plan;
  if (run.device == Device::cuda)
    spdlog::info("device: cuda:{} on every rank ({} GPU(s) visible per rank at least{}), backend {}{}",
                 plan.cuda_device, plan.survey.min_devices, plan.survey.shared ? ", shared by several ranks" : "",
                 comm_backend_name(plan.backend),
                 plan.backend == CommBackend::mpi ? " (staged through pinned host memory)" : "");
  const GPTShape& s = run.shape;
  spdlog::info("model: {} layers, {} wide, {} heads ({} kv), vocab {} (padded {}), {} positions: {:.2f}M parameters",
               s.L, s.C, s.Hq, s.Hkv, s.V, s.Vp, s.rope ? "rotary" : "learned", double(run.n_params) / 1e6);
  spdlog::info("layout: {} ranks = DP {} x SP {}; micro-batch {} x {} tokens ({} per rank), {} micro-steps, "
               "{} tokens per step; {} threads per rank",
               run.mpi.world_size, run.DP, run.P, run.B, run.N, run.T, run.accum, run.tokens_per_step,
               omp_get_max_threads());
  // on cuda the fp32 master weights and their bf16 compute copy
  GPT& model = run.model;
  const double param_bytes = double(model.params_padded().bytes()) +
                             (run.per_layer ? run.layer_zero->parameter_bytes() : 0) +
                             (run.device == Device::cuda ? double(model.compute_params_padded().bytes()) : 0);
  const double grad_bytes = double(model.grads_padded().bytes()) + (run.per_layer ? run.layer_zero->gradient_bytes() : 0);
  const double state_bytes =
      run.per_layer ? double(run.layer_zero->state_bytes()) : double(run.optimizer->shard_size()) * 8;
  spdlog::info("memory per rank: parameters {:.1f} MiB, gradients {:.1f} MiB, optimizer {:.1f} MiB (ZeRO {}), "
               "activations {:.1f} MiB (recompute {}, tile_tokens {}){}",
               param_bytes / 1048576.0, grad_bytes / 1048576.0, state_bytes / 1048576.0, run.zero_stage,
               model.activation_bytes() / 1048576.0, cfg.runtime.recompute, cfg.runtime.tile_tokens,
               cfg.runtime.offload == "checkpoints"
                   ? fmt::format(", offloaded checkpoints {:.1f} MiB of pinned host memory",
                                 model.offloaded_checkpoint_bytes() / 1048576.0)
                   : std::string());
}

void open_metrics(TrainRun& run) {
  if (run.cfg.logging.metrics_file.empty()) return;
  on_root(run.host(), [&] {
    run.metrics = std::make_unique<MetricsWriter>(run.cfg.logging.metrics_file, /*append=*/bool(run.resume));
  });
}

}  // namespace ulysses
