// The training loop (see core/trainer.h). One optimizer step:
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
// Checkpoints, llm.c import / export stage the parameters and optimizer state through host memory.
#include "core/trainer.h"

#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "comm/groups.h"
#include "comm/watchdog.h"
#include "core/checkpoint.h"
#include "core/data.h"
#include "core/base/error.h"
#include "core/gpt.h"
#include "core/hf.h"
#include "core/llmc.h"
#include "core/metrics.h"
#include "core/optimizer.h"
#include "core/zero.h"
#include "core/zero3.h"
#include "core/signals.h"
#include "core/tokenizer.h"

namespace ulysses {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// A host buffer as a tensor, for ops::copy between the host and the model's device.
Tensor host_tensor(const float* p, int64_t n) { return Tensor(const_cast<float*>(p), {n}, DType::f32, Device::cpu); }


std::string format_duration(double seconds) {
  const int64_t s = int64_t(seconds + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60)
                   : fmt::format("{}:{:02d}", s / 60, s % 60);
}

// Runs `fn` on world rank 0 only (file I/O that one rank does for everybody). A UserError there
// is broadcast and rethrown on every rank, so the job fails everywhere with the same message
// instead of leaving the other ranks waiting in the next collective.
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

// Mean validation loss over eval_steps micro-batches from the start of the split.
double evaluate(GPT& model, DataLoader& val, int steps, Communicator& world, std::vector<int32_t>& tok,
                std::vector<int32_t>& tgt, std::vector<int32_t>& pos) {
  val.reset();
  double sums[2] = {0, 0};  // loss sum, token count
  for (int i = 0; i < steps; ++i) {
    val.next(tok.data(), tgt.data(), pos.data());
    int64_t count = 0;
    sums[0] += model.forward_loss(tok.data(), tgt.data(), pos.data(), &count);
    sums[1] += double(count);
  }
  world.all_reduce(sums, sums, 2, DType::f64, ReduceOp::sum);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

// Generates `n` tokens with a P = 1 copy of the model on the same device that shares the trained
// parameters (on cuda its own stream: the trained model's is synchronised first).
std::string sample(const Config& cfg, GPT& trained, Device device, Tokenizer& tok) {
  const int window = cfg.model.rope() ? cfg.train.seq_len : std::min(cfg.train.seq_len, cfg.model.max_seq_len);
  ops::synchronize(trained.context());
  GPT sampler(cfg.model, {1, window, 1, 0}, device, nullptr, &trained);
  if (device == Device::cuda) sampler.context().cudnn_attention = trained.context().cudnn_attention;
  const int V = cfg.model.vocab_size, Vp = cfg.model.padded_vocab_size();
  std::vector<int32_t> context = {tok.eot_token() >= 0 ? tok.eot_token() : int32_t('\n')};
  const size_t W = static_cast<size_t>(window);
  std::vector<int32_t> tokens(W, 0), positions(W);
  for (int i = 0; i < window; ++i) positions[size_t(i)] = i;
  std::vector<float> logits(static_cast<size_t>(Vp));
  std::mt19937_64 rng(cfg.train.seed + 1);
  std::vector<int32_t> generated;
  for (int i = 0; i < cfg.train.sample_tokens; ++i) {
    const size_t len = std::min(context.size(), size_t(window));
    std::copy(context.end() - std::ptrdiff_t(len), context.end(), tokens.begin());
    sampler.forward_logits(tokens.data(), positions.data(), int64_t(len) - 1, logits.data());
    // softmax with temperature over the real vocabulary, then an inverse-CDF draw
    const double temp = std::max(1e-4, cfg.train.sample_temperature);
    double maxv = -1e30;
    for (int v = 0; v < V; ++v) maxv = std::max(maxv, double(logits[size_t(v)]));
    double total = 0;
    std::vector<double> p(static_cast<size_t>(V));
    for (int v = 0; v < V; ++v) total += p[size_t(v)] = std::exp((logits[size_t(v)] - maxv) / temp);
    const double u = (double(rng() >> 11) * (1.0 / 9007199254740992.0)) * total;
    double acc = 0;
    int32_t next = V - 1;
    for (int v = 0; v < V; ++v)
      if ((acc += p[size_t(v)]) > u) {
        next = v;
        break;
      }
    context.push_back(next);
    generated.push_back(next);
  }
  return tok.decode(generated);
}

// Resuming with another layout (e.g. a checkpoint of SP 4 x DP 1 into SP 2 x DP 2). Checkpoints
// hold the whole parameters and the whole AdamW state (ZeRO shards are gathered when saving) and
// the data position in global sequences (core/data.h), so any DP x SP layout continues from
// them; what is checked here is that the recorded layout is one a run could have had.
void check_resume_layout(const std::string& path, const TrainState& saved, int world_size, int sequence_parallel) {
  if (saved.world_size < 1 || saved.sequence_parallel < 1 || saved.world_size % saved.sequence_parallel != 0)
    throw_user_error("{}/state.yaml: the recorded layout (world_size {}, sequence_parallel {}) is not a valid "
                     "DP x SP layout: the checkpoint is damaged",
                     path, saved.world_size, saved.sequence_parallel);
  if (saved.world_size != world_size || saved.sequence_parallel != sequence_parallel)
    spdlog::info("resuming a checkpoint written with SP {} x DP {} ({} ranks) as SP {} x DP {} ({} ranks): "
                 "parameters and optimizer state are whole, the data position carries over",
                 saved.sequence_parallel, saved.world_size / saved.sequence_parallel, saved.world_size,
                 sequence_parallel, world_size / sequence_parallel, world_size);
}

// `ulysses dump` (core/trainer.h): the first training micro-batch's tokens, logits, mean loss and
// gradients, written by rank 0. Every rank holds the same weights; rank r of the SP group holds
// tokens r T .. r T + T - 1 of each sequence (positions say which), so the full [B, N, V] logits
// are each rank's rows placed by position and summed over the world (the other entries are 0).
void dump_first_batch(const Config& cfg, GPT& model, DataLoader& data, Communicator& host, const std::string& path) {
  const GPTShape& s = model.shape();
  const int B = model.run_shape().B, N = model.run_shape().N, T = model.run_shape().T();
  const size_t rows = size_t(B) * size_t(T), V = size_t(s.V), Vp = size_t(s.Vp);
  std::vector<int32_t> tok(rows), tgt(rows), pos(rows);
  data.next(tok.data(), tgt.data(), pos.data());

  std::vector<float> local(rows * Vp);  // [B*T, Vp]
  model.forward_all_logits(tok.data(), pos.data(), local.data());
  std::vector<float> logits(size_t(B) * size_t(N) * V, 0.0f);                 // [B, N, V]
  std::vector<float> tokens(size_t(B) * size_t(N), 0.0f), targets(tokens.size(), 0.0f);  // [B, N]
  for (size_t r = 0; r < rows; ++r) {
    const size_t at = (r / size_t(T)) * size_t(N) + size_t(pos[r]);  // b * N + n
    std::copy(local.begin() + std::ptrdiff_t(r * Vp), local.begin() + std::ptrdiff_t(r * Vp + V),
              logits.begin() + std::ptrdiff_t(at * V));
    tokens[at] = float(tok[r]);
    targets[at] = float(tgt[r]);
  }
  host.all_reduce(logits.data(), logits.data(), logits.size(), DType::f32, ReduceOp::sum);
  host.all_reduce(tokens.data(), tokens.data(), tokens.size(), DType::f32, ReduceOp::sum);
  host.all_reduce(targets.data(), targets.data(), targets.size(), DType::f32, ReduceOp::sum);

  model.zero_grad();
  int64_t count = 0;
  double sums[2] = {model.forward_backward(tok.data(), tgt.data(), pos.data(), &count), 0};
  sums[1] = double(count);
  host.all_reduce(sums, sums, 2, DType::f64, ReduceOp::sum);
  const int64_t n_params = num_parameters(s);
  std::vector<float> grads(static_cast<size_t>(n_params));
  ops::copy(model.context(), host_tensor(grads.data(), n_params), model.grads_flat());
  ops::synchronize(model.context());
  host.all_reduce(grads.data(), grads.data(), grads.size(), DType::f32, ReduceOp::sum);
  const double tokens_total = std::max(1.0, sums[1]);
  for (float& g : grads) g = float(double(g) / tokens_total);

  on_root(host, [&] {
    std::vector<NamedTensor> out;
    out.push_back({"tokens", {B, N}, std::move(tokens)});
    out.push_back({"targets", {B, N}, std::move(targets)});
    out.push_back({"logits", {B, N, s.V}, std::move(logits)});
    out.push_back({"loss", {}, {float(sums[0] / tokens_total)}});
    for (NamedTensor& g : hf_gpt2_tensors(cfg.model, grads.data(), grads.size())) {
      g.name = "grad." + g.name;
      out.push_back(std::move(g));
    }
    write_safetensors(path, out, {{"format", "ulysses-dump"}, {"loss", fmt::format("{}", sums[0] / tokens_total)}});
    spdlog::info("dump: loss {:.6f} over {} tokens; logits, loss and gradients written to {}", sums[0] / tokens_total,
                 int64_t(sums[1]), path);
  });
}

}  // namespace

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

int run_train(const Config& cfg, MpiRuntime& mpi, const std::string& dump_path) {
  validate_for_world(cfg, mpi.world_size);
  // (dump sums the gradients itself: the ZeRO 2 / 3 shards and the overlapped all-reduces would
  // have reduced them already)
  if (!dump_path.empty() &&
      (cfg.parallel.zero_stage >= 2 || mpi.world_size != cfg.parallel.sequence || cfg.runtime.overlap_comm))
    throw AllRanksUserError(fmt::format(
        "ulysses dump needs one data-parallel group (world size {} = parallel.sequence {}), parallel.zero_stage "
        "0 or 1 (it is {}) and runtime.overlap_comm false",
        mpi.world_size, cfg.parallel.sequence, cfg.parallel.zero_stage));
  // cpu or cuda, MPI or NCCL, agreed by every rank; the GPU picked by local rank (comm/groups.h)
  const DevicePlan plan = setup_devices(cfg.runtime.device, cfg.parallel.backend, mpi);
  const Device device = plan.device;
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

  // Reliability (docs/reliability.md): SIGTERM / SIGUSR1 / SIGINT stop the run cleanly at a step
  // boundary; every collective on the groups below is timed by the watchdog, which aborts the
  // job when one takes longer than runtime.comm_timeout. Declared first: they outlive the groups.
  StopSignals stop_signals;
  Watchdog watchdog(mpi.world_rank, cfg.runtime.comm_timeout);
  order_nccl_launches(plan.backend == CommBackend::nccl &&
                      (cfg.runtime.overlap_comm || cfg.runtime.all_to_all_chunks > 1));
  ProcessGroups groups = make_process_groups(cfg.parallel.sequence, plan.backend, device, mpi.comm);
  watch_process_groups(groups, watchdog);
  Communicator& world = *groups.world;      // the model's memory: gradients, ZeRO all-gathers
  Communicator& host = groups.host_world();  // host memory: sums, votes, errors, staging
  // NCCL collectives return once enqueued: the host waits on them inside these regions
  const bool watch_regions = plan.backend == CommBackend::nccl;
  const int P = groups.sp_size, DP = groups.dp_size;
  const int B = cfg.train.micro_batch_size, N = cfg.train.seq_len, T = N / P;
  const int64_t tokens_per_micro = int64_t(B) * N * DP;  // one micro-step over all ranks
  const int accum = cfg.train.global_batch_tokens > 0 ? int(cfg.train.global_batch_tokens / tokens_per_micro) : 1;
  const int64_t tokens_per_step = tokens_per_micro * accum;

  // ZeRO (core/zero.h) shards the flat buffers evenly over the world: pad them to a multiple of it.
  // Stages 2 and 3 work per layer (core/zero3.h): the model then stores no layer gradients (2) or
  // no layer parameters and gradients (3), and the optimizer is LayerShardedZero, whose shards are
  // the fp32 master weights: on cuda the model keeps only its bf16 compute copy (master_weights).
  const int zero_stage = cfg.parallel.zero_stage;
  const bool per_layer = zero_stage >= 2;
  GPTRunShape run{B, N, P, cfg.runtime.tile_tokens, parse_recompute(cfg.runtime.recompute), mpi.world_size};
  run.sharded_layer_grads = per_layer;
  run.sharded_layer_params = zero_stage == 3;
  run.master_weights = !per_layer;
  run.offload_checkpoints = cfg.runtime.offload == "checkpoints";  // config: needs recompute full, cuda
  run.all_to_all_chunks = cfg.runtime.all_to_all_chunks;  // comm/ulysses.h; no effect at P = 1
  GPT model(cfg.model, run, device, groups.sequence.get());
  model.context().cudnn_attention = uses_cudnn_attention(cfg);  // runtime.attention
  ops::Context& ctx = model.context();
  groups.set_stream(ctx.stream());  // every device collective runs in order with the model's kernels
  std::optional<ZeroAdamW> optimizer;
  std::optional<LayerShardedZero> layer_zero;
  if (per_layer)
    layer_zero.emplace(cfg.train, model, zero_stage, world, &host, cfg.runtime.overlap_comm);
  else
    optimizer.emplace(cfg.train, model.shape(), zero_stage, world, device, &host);
  // ZeRO 0 / 1 with runtime.overlap_comm (cuda; config checks): each layer's gradients are
  // all-reduced during the step's last backward, on a comm stream (core/zero.h). Declared after
  // the model, so destroyed before it: its destructor waits for its stream, uninstalls its hooks.
  std::optional<OverlappedGradientAllReduce> overlapped;
  if (!per_layer && cfg.runtime.overlap_comm) overlapped.emplace(model, world);
  const GPTShape shape = model.shape();
  const int64_t n_params = num_parameters(shape);
  // ZeRO 2 and 3: the whole parameters on rank 0, gathered from / scattered to the shards
  std::vector<float> params_whole;

  // The master weights as host memory for file I/O: on cpu the model's own buffer, on cuda a
  // host copy moved with download_params / upload_params (ZeRO 0 and 1).
  std::vector<float> params_staging;
  auto host_params = [&]() -> float* {
    if (device == Device::cpu) return model.params_flat().f32();
    params_staging.resize(size_t(n_params));
    return params_staging.data();
  };
  auto download_params = [&]() -> float* {
    float* p = host_params();
    if (device != Device::cpu) {
      ops::copy(ctx, host_tensor(p, n_params), model.params_flat());
      ops::synchronize(ctx);
    }
    return p;
  };
  auto upload_params = [&](const float* p) {
    if (device != Device::cpu) {
      ops::copy(ctx, model.params_flat(), host_tensor(p, n_params));
      ops::synchronize(ctx);
      params_staging = {};
    }
  };

  const DataSlice slice{groups.sp_rank, P, groups.dp_rank, DP};
  DataLoader train_data(cfg.data, "train", B, N, slice, cfg.train.seed, cfg.model.vocab_size);
  std::unique_ptr<DataLoader> val_data;
  if (cfg.data.source == "synthetic" || !cfg.data.val.empty())
    val_data = std::make_unique<DataLoader>(cfg.data, "val", B, N, slice, cfg.train.seed + 7, cfg.model.vocab_size);
  spdlog::info("data: train: {}", train_data.describe());
  spdlog::info("data: val: {}", val_data ? val_data->describe() : std::string("none (data.val is empty): no validation loss"));

  // -- initial state: a checkpoint, or GPT-2 init from the seed (identical on every rank)
  TrainState state;
  const std::optional<std::string> resume = resolve_resume(cfg.checkpoint);
  if (resume) {
    // rank 0 reads parameters and the whole AdamW state; everybody gets the same bits (its
    // shards at ZeRO >= 1)
    float* params = per_layer ? nullptr : host_params();
    std::vector<float> m_whole, v_whole;
    on_root(host, [&] {
      m_whole.resize(size_t(n_params));
      v_whole.resize(size_t(n_params));
      if (per_layer) {
        params_whole.resize(size_t(n_params));
        params = params_whole.data();
      }
      state = load_checkpoint(*resume, shape, params, m_whole.data(), v_whole.data(), n_params);
      check_resume_layout(*resume, state, mpi.world_size, P);
    });
    if (per_layer) {
      layer_zero->scatter_full(params_whole.data(), m_whole.data(), v_whole.data(), /*with_state=*/true);
      params_whole = {};
    } else {
      host.broadcast(params, size_t(n_params), DType::f32, 0);
      upload_params(params);
      optimizer->scatter_state(ctx, m_whole.data(), v_whole.data());  // each rank keeps its shard
    }
    int64_t words[4] = {state.step, int64_t(state.data.epoch), int64_t(state.data.next_sequence),
                        state.skipped_in_a_row};
    host.broadcast(words, 4, DType::f64 /* 8-byte words */, 0);
    state.step = int(words[0]);
    state.data.epoch = uint64_t(words[1]);
    state.data.next_sequence = uint64_t(words[2]);
    state.skipped_in_a_row = int(words[3]);
    train_data.restore(state.data);
    spdlog::info("resumed from {} at step {}", *resume, state.step);
  } else if (!cfg.checkpoint.init_from.empty()) {
    // GPT-2 weights: llm.c's .bin (e.g. gpt2_124M.bin) or Hugging Face's directory / .safetensors
    // (core/hf.h); the config must describe the same model
    const bool hf = is_hf_checkpoint(cfg.checkpoint.init_from);
    float* params = per_layer ? nullptr : host_params();
    on_root(host, [&] {
      if (per_layer) {
        params_whole.resize(size_t(n_params));
        params = params_whole.data();
      }
      if (hf)
        read_hf_checkpoint(cfg.checkpoint.init_from, cfg.model, params, size_t(n_params));
      else
        read_llmc_checkpoint(cfg.checkpoint.init_from, llmc_header_for(cfg.model), params, size_t(n_params));
    });
    if (per_layer) {
      layer_zero->scatter_full(params_whole.data(), nullptr, nullptr, /*with_state=*/false);
      params_whole = {};
    } else {
      host.broadcast(params, size_t(n_params), DType::f32, 0);
      upload_params(params);
    }
    spdlog::info("initialised from {} checkpoint {}", hf ? "Hugging Face" : "llm.c", cfg.checkpoint.init_from);
  } else if (per_layer) {
    layer_zero->init_weights(cfg.train.seed);  // the same values, each rank keeping its shards
  } else {
    model.init_weights(cfg.train.seed);
  }
  // the bf16 copy of whatever the master weights now hold (ZeRO 2, 3: LayerShardedZero wrote it)
  if (!per_layer) model.refresh_compute_params();
  state.world_size = mpi.world_size;
  state.sequence_parallel = P;
  state.zero_stage = cfg.parallel.zero_stage;
  if (!dump_path.empty()) {
    dump_first_batch(cfg, model, train_data, host, dump_path);
    return 0;
  }

  if (device == Device::cuda)
    spdlog::info("device: cuda:{} on every rank ({} GPU(s) visible per rank at least{}), backend {}{}",
                 plan.cuda_device, plan.survey.min_devices, plan.survey.shared ? ", shared by several ranks" : "",
                 comm_backend_name(plan.backend),
                 plan.backend == CommBackend::mpi ? " (staged through pinned host memory)" : "");
  spdlog::info("model: {} layers, {} wide, {} heads ({} kv), vocab {} (padded {}), {} positions: {:.2f}M parameters",
               shape.L, shape.C, shape.Hq, shape.Hkv, shape.V, shape.Vp, shape.rope ? "rotary" : "learned",
               double(n_params) / 1e6);
  spdlog::info("layout: {} ranks = DP {} x SP {}; micro-batch {} x {} tokens ({} per rank), {} micro-steps, "
               "{} tokens per step; {} threads per rank",
               mpi.world_size, DP, P, B, N, T, accum, tokens_per_step, omp_get_max_threads());
  // on cuda the fp32 master weights and their bf16 compute copy
  const double param_bytes = double(model.params_padded().bytes()) + (per_layer ? layer_zero->parameter_bytes() : 0) +
                             (device == Device::cuda ? double(model.compute_params_padded().bytes()) : 0);
  const double grad_bytes = double(model.grads_padded().bytes()) + (per_layer ? layer_zero->gradient_bytes() : 0);
  const double state_bytes = per_layer ? double(layer_zero->state_bytes()) : double(optimizer->shard_size()) * 8;
  spdlog::info("memory per rank: parameters {:.1f} MiB, gradients {:.1f} MiB, optimizer {:.1f} MiB (ZeRO {}), "
               "activations {:.1f} MiB (recompute {}, tile_tokens {}){}",
               param_bytes / 1048576.0, grad_bytes / 1048576.0, state_bytes / 1048576.0, zero_stage,
               model.activation_bytes() / 1048576.0, cfg.runtime.recompute, cfg.runtime.tile_tokens,
               cfg.runtime.offload == "checkpoints"
                   ? fmt::format(", offloaded checkpoints {:.1f} MiB of pinned host memory",
                                 model.offloaded_checkpoint_bytes() / 1048576.0)
                   : std::string());

  std::unique_ptr<MetricsWriter> metrics;
  if (!cfg.logging.metrics_file.empty())
    on_root(host, [&] { metrics = std::make_unique<MetricsWriter>(cfg.logging.metrics_file, /*append=*/bool(resume)); });

  const int64_t flops_token = flops_per_token(shape, N, /*causal_halved=*/true);
  std::vector<int32_t> tok(size_t(B) * T), tgt(size_t(B) * T), pos(size_t(B) * T);
  auto save = [&](int step) {
    if (cfg.checkpoint.dir.empty()) return;
    state.step = step;
    state.data = train_data.state();
    // the whole parameters and AdamW state on rank 0 (gathered from the shards, through host
    // memory on cuda)
    const bool root = host.rank() == 0;
    std::vector<float> m_whole(root ? size_t(n_params) : 0), v_whole(root ? size_t(n_params) : 0);
    const float* params = nullptr;
    if (per_layer) {  // collective
      if (root) params_whole.resize(size_t(n_params));
      layer_zero->gather_full(params_whole.data(), m_whole.data(), v_whole.data(), /*with_state=*/true);
      params = params_whole.data();
    } else {
      optimizer->gather_state(ctx, root ? m_whole.data() : nullptr, root ? v_whole.data() : nullptr);  // collective
      params = root ? download_params() : nullptr;  // every rank holds the same weights
    }
    on_root(host, [&] {
      const std::string path =
          save_checkpoint(cfg.checkpoint.dir, cfg, shape, state, params, m_whole.data(), v_whole.data(), n_params);
      spdlog::info("saved checkpoint {}", path);
    });
    params_whole = {};
    if (device != Device::cpu) params_staging = {};
  };

  const auto run_start = Clock::now();
  const int first_step = state.step;
  double last_val = -1;
  for (int step = state.step; step < cfg.train.max_steps; ++step) {
    const auto t0 = Clock::now();
    watchdog.set_step(step + 1);
    for (Communicator* c : {groups.world.get(), groups.sequence.get(), groups.host.get()})
      if (c) c->counters().reset();

    model.zero_grad();
    if (per_layer) layer_zero->zero_grad();
    double sums[2] = {0, 0};  // loss sum, token count over this rank's micro-batches
    {
      WatchedRegion region(watchdog, watch_regions, "forward/backward (NCCL all-to-alls)", groups.sequence->name().c_str());
      for (int k = 0; k < accum; ++k) {
        train_data.next(tok.data(), tgt.data(), pos.data());
        int64_t count = 0;
        if (overlapped) overlapped->set_last_micro_batch(k == accum - 1);  // only its backward reduces
        sums[0] += model.forward_backward(tok.data(), tgt.data(), pos.data(), &count);  // reads the loss: waits
        sums[1] += double(count);
      }
    }
    // Testing aid (runtime.debug_inject_nan_step): a NaN in one rank's gradient must reach every
    // rank through the all-reduce and make the step skip.
    const RuntimeConfig& rt = cfg.runtime;
    if (rt.debug_inject_nan_step > 0 && step + 1 >= rt.debug_inject_nan_step &&
        step + 1 < rt.debug_inject_nan_step + rt.debug_inject_nan_steps && world.rank() == world.size() - 1) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      ops::copy(ctx, model.grads_flat().rows(0, 1), host_tensor(&nan, 1));
      ops::synchronize(ctx);
    }
    // every rank holds the same parameters and saw different tokens: sum over DP × SP (all-reduce,
    // or reduce-scatter into this rank's shard with ZeRO 2) and the norm of the sum
    double grad_squares = 0;
    {
      WatchedRegion region(watchdog, watch_regions, "gradient reduction (NCCL)", world.name().c_str());
      grad_squares = per_layer ? layer_zero->reduce_gradients()
                               : optimizer->reduce_gradients(ctx, model.grads_padded(),
                                                             overlapped ? &*overlapped : nullptr);  // the norm's read waits
    }
    host.all_reduce(sums, sums, 2, DType::f64, ReduceOp::sum);
    const double tokens = std::max(1.0, sums[1]);
    const double loss = sums[0] / tokens;
    const double grad_norm = std::sqrt(grad_squares) / tokens;
    const double lr = learning_rate(cfg.train, step);

    StepMetrics m;
    m.step = step + 1;
    m.loss = loss;
    m.lr = lr;
    m.grad_norm = grad_norm;
    m.tokens = tokens_per_step;
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
      m.skipped = true;
      state.skipped_in_a_row += 1;
      spdlog::warn("step {}: non-finite loss ({}) or gradient norm ({}): update skipped ({} in a row)", step + 1, loss,
                   grad_norm, state.skipped_in_a_row);
      if (state.skipped_in_a_row >= cfg.train.max_skipped_steps)
        throw AllRanksUserError(fmt::format("{} consecutive steps had a non-finite loss or gradient norm (train.max_skipped_steps"
                                    " = {}); stopping. The last checkpoint (if any) is intact.",
                                    state.skipped_in_a_row, cfg.train.max_skipped_steps));
    } else {
      state.skipped_in_a_row = 0;
      const double clip = cfg.train.grad_clip > 0 && grad_norm > cfg.train.grad_clip ? cfg.train.grad_clip / grad_norm : 1.0;
      WatchedRegion region(watchdog, watch_regions, "optimizer step (NCCL all-gather)", world.name().c_str());
      if (per_layer) {
        layer_zero->update(float(lr), float(clip / tokens), step + 1);
      } else {
        optimizer->update(ctx, model.params_padded(), model.grads_padded(), float(lr), float(clip / tokens), step + 1,
                          model.compute_params_padded());
        // ZeRO 1 all-gathered master weights: the other shards' compute copy is stale (core/zero.h)
        if (optimizer->stage() >= 1) model.refresh_compute_params();
      }
      ops::synchronize(ctx);  // the step time below covers the device work (no-op on cpu)
    }
    m.step_ms = ms_since(t0);
    m.tokens_per_second = double(tokens_per_step) / (m.step_ms / 1000.0);
    m.tflops_per_rank = double(flops_token) * double(tokens_per_step) / mpi.world_size / (m.step_ms / 1000.0) / 1e12;
    m.peak_memory_gib = peak_rss_gib();
    m.comm = groups.world->counters();
    for (Communicator* c : {groups.sequence.get(), groups.host.get()})
      if (c)
        for (size_t k = 0; k < m.comm.bytes_sent.size(); ++k) m.comm.bytes_sent[k] += c->counters().bytes_sent[k];

    const bool last = step + 1 == cfg.train.max_steps;
    if (val_data && cfg.train.eval_steps > 0 && ((cfg.train.eval_interval > 0 && (step + 1) % cfg.train.eval_interval == 0) || last)) {
      WatchedRegion region(watchdog, watch_regions, "validation (NCCL all-to-alls)", groups.sequence->name().c_str());
      last_val = evaluate(model, *val_data, cfg.train.eval_steps, host, tok, tgt, pos);
      m.val_loss = last_val;
    }
    if (metrics) metrics->write(m);
    if ((step + 1) % std::max(1, cfg.logging.interval) == 0 || last) {
      const double elapsed = ms_since(run_start) / 1000.0;
      const double eta = elapsed / (step + 1 - first_step) * (cfg.train.max_steps - step - 1);
      spdlog::info("step {:>5}/{} | loss {:.4f}{} | lr {:.2e} | norm {:.3f} | {:.1f} ms | {:.0f} tok/s | "
                   "{:.3f} TFLOP/s/rank | {:.2f} GiB | ETA {}",
                   step + 1, cfg.train.max_steps, loss, m.val_loss >= 0 ? fmt::format(" (val {:.4f})", m.val_loss) : "",
                   lr, grad_norm, m.step_ms, m.tokens_per_second, m.tflops_per_rank, m.peak_memory_gib,
                   format_duration(eta));
    }
    const bool saved = cfg.checkpoint.interval > 0 && (step + 1) % cfg.checkpoint.interval == 0 && !last;
    if (saved) save(step + 1);
    // Graceful stop: one all-reduce(max) so every rank stops after the same step, even when only
    // one of them was signalled. The last step ends normally below.
    if (const int signo = stop_signals.agree(host); signo != 0 && !last) {
      if (!saved) save(step + 1);
      if (host.rank() == 0 && cfg.checkpoint.dir.empty()) {
        spdlog::warn("{}: stopped after step {} of {}; no checkpoint was written (checkpoint.dir is not set), "
                     "so this run's progress is lost",
                     signal_name(signo), step + 1, cfg.train.max_steps);
      } else if (host.rank() == 0) {
        spdlog::warn("{}: stopped after step {} of {}; checkpoint {}/step_{:08d} written. To continue, rerun the "
                     "same command with --set checkpoint.resume=auto",
                     signal_name(signo), step + 1, cfg.train.max_steps, cfg.checkpoint.dir, step + 1);
      }
      return 0;
    }
  }
  if (first_step < cfg.train.max_steps) save(cfg.train.max_steps);
  // At ZeRO 2 and 3 the whole fp32 weights exist only as the shards (at ZeRO 2 the model holds
  // them whole on the CPU, but on cuda only as its bf16 compute copy): gather them on rank 0 for
  // the export; at ZeRO 3 also for the sample (which then runs on a whole P = 1 copy on the CPU;
  // at ZeRO 2 the sampler shares the model's whole compute copy)
  const bool exporting = !cfg.checkpoint.export_llmc.empty() || !cfg.checkpoint.export_hf.empty();
  const bool gather_whole = per_layer && (exporting ||
                                          (zero_stage == 3 && cfg.train.sample_tokens > 0));
  if (gather_whole) {
    if (world.rank() == 0) params_whole.resize(size_t(n_params));
    layer_zero->gather_full(params_whole.data(), nullptr, nullptr, /*with_state=*/false);
  }
  const float* final_params = gather_whole ? params_whole.data() : nullptr;
  if (exporting) {
    const float* params = gather_whole ? final_params : (host.rank() == 0 ? download_params() : nullptr);
    on_root(host, [&] {
      if (!cfg.checkpoint.export_llmc.empty()) {
        write_llmc_checkpoint(cfg.checkpoint.export_llmc, llmc_header_for(cfg.model), params, size_t(n_params));
        spdlog::info("exported llm.c checkpoint {}", cfg.checkpoint.export_llmc);
      }
      if (!cfg.checkpoint.export_hf.empty()) {
        write_hf_checkpoint(cfg.checkpoint.export_hf, cfg.model, params, size_t(n_params));
        spdlog::info("exported Hugging Face GPT-2 checkpoint {} (config.json, model.safetensors)", cfg.checkpoint.export_hf);
      }
    });
  }

  if (cfg.train.sample_tokens > 0) {
    on_root(host, [&] {
      std::unique_ptr<Tokenizer> tokenizer;
      if (cfg.data.tokenizer == "gpt2")
        tokenizer = std::make_unique<GPT2Tokenizer>(cfg.data.tokenizer_dir);
      else
        tokenizer = std::make_unique<ByteTokenizer>();
      std::optional<GPT> whole;
      if (gather_whole && zero_stage == 3) {
        whole.emplace(cfg.model, GPTRunShape{1, 1, 1, 0}, Device::cpu, nullptr);
        std::memcpy(whole->params_flat().data, final_params, size_t(n_params) * 4);
      }
      spdlog::info("sample ({} tokens, temperature {}):\n{}", cfg.train.sample_tokens, cfg.train.sample_temperature,
                   sample(cfg, whole ? *whole : model, whole ? Device::cpu : device, *tokenizer));
    });
  }
  return 0;
}

}  // namespace ulysses
