// What a training run reads and writes besides its data (core/train_run.h): the initial state
// (a checkpoint to resume, GPT-2 weights to start from, or the seed), checkpoints during the
// run, and at the end the last checkpoint, the llm.c / Hugging Face exports and the sample.
// Checkpoints and exports stage the parameters and optimizer state through host memory, whole
// on rank 0 (ZeRO shards are gathered when saving and scattered when loading).
#include <cstring>

#include <spdlog/spdlog.h>

#include "core/base/error.h"
#include "core/hf.h"
#include "core/llmc.h"
#include "core/train_run.h"

namespace ulysses {

namespace {

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

// Rank 0 reads the parameters and the whole AdamW state; everybody gets the same bits (its
// shards at ZeRO >= 1), and the step, data position and skip count.
void resume_from(TrainRun& run, const std::string& path) {
  float* params = run.per_layer ? nullptr : run.host_params();
  std::vector<float> m_whole, v_whole;
  on_root(run.host(), [&] {
    m_whole.resize(size_t(run.n_params));
    v_whole.resize(size_t(run.n_params));
    if (run.per_layer) {
      run.params_whole.resize(size_t(run.n_params));
      params = run.params_whole.data();
    }
    run.state = load_checkpoint(path, run.shape, params, m_whole.data(), v_whole.data(), run.n_params);
    check_resume_layout(path, run.state, run.mpi.world_size, run.P);
  });
  if (run.per_layer) {
    run.layer_zero->scatter_full(run.params_whole.data(), m_whole.data(), v_whole.data(), /*with_state=*/true);
    run.params_whole = {};
  } else {
    run.host().broadcast(params, size_t(run.n_params), DType::f32, 0);
    run.upload_params(params);
    run.optimizer->scatter_state(run.ctx(), m_whole.data(), v_whole.data());  // each rank keeps its shard
  }
  TrainState& state = run.state;
  int64_t words[4] = {state.step, int64_t(state.data.epoch), int64_t(state.data.next_sequence),
                      state.skipped_in_a_row};
  run.host().broadcast(words, 4, DType::f64 /* 8-byte words */, 0);
  state.step = int(words[0]);
  state.data.epoch = uint64_t(words[1]);
  state.data.next_sequence = uint64_t(words[2]);
  state.skipped_in_a_row = int(words[3]);
  run.train_data.restore(state.data);
  spdlog::info("resumed from {} at step {}", path, state.step);
}

// GPT-2 weights: llm.c's .bin (e.g. gpt2_124M.bin) or Hugging Face's directory / .safetensors
// (core/hf.h); the config must describe the same model.
void init_from_gpt2(TrainRun& run, const std::string& path) {
  const bool hf = is_hf_checkpoint(path);
  float* params = run.per_layer ? nullptr : run.host_params();
  on_root(run.host(), [&] {
    if (run.per_layer) {
      run.params_whole.resize(size_t(run.n_params));
      params = run.params_whole.data();
    }
    if (hf)
      read_hf_checkpoint(path, run.cfg.model, params, size_t(run.n_params));
    else
      read_llmc_checkpoint(path, llmc_header_for(run.cfg.model), params, size_t(run.n_params));
  });
  if (run.per_layer) {
    run.layer_zero->scatter_full(run.params_whole.data(), nullptr, nullptr, /*with_state=*/false);
    run.params_whole = {};
  } else {
    run.host().broadcast(params, size_t(run.n_params), DType::f32, 0);
    run.upload_params(params);
  }
  spdlog::info("initialised from {} checkpoint {}", hf ? "Hugging Face" : "llm.c", path);
}

}  // namespace

void load_initial_state(TrainRun& run) {
  run.resume = resolve_resume(run.cfg.checkpoint);
  if (run.resume)
    resume_from(run, *run.resume);
  else if (!run.cfg.checkpoint.init_from.empty())
    init_from_gpt2(run, run.cfg.checkpoint.init_from);
  else if (run.per_layer)
    run.layer_zero->init_weights(run.cfg.train.seed);  // the same values, each rank keeping its shards
  else
    run.model.init_weights(run.cfg.train.seed);  // GPT-2 init from the seed, identical on every rank
  // the bf16 copy of whatever the master weights now hold (ZeRO 2, 3: LayerShardedZero wrote it)
  if (!run.per_layer) run.model.refresh_compute_params();
  run.state.world_size = run.mpi.world_size;
  run.state.sequence_parallel = run.P;
  run.state.zero_stage = run.cfg.parallel.zero_stage;
}

void save_checkpoint(TrainRun& run, int step) {
  if (run.cfg.checkpoint.dir.empty()) return;
  run.state.step = step;
  run.state.data = run.train_data.state();
  // the whole parameters and AdamW state on rank 0 (gathered from the shards, through host
  // memory on cuda)
  const bool root = run.host().rank() == 0;
  const size_t n = root ? size_t(run.n_params) : 0;
  std::vector<float> m_whole(n), v_whole(n);
  const float* params = nullptr;
  if (run.per_layer) {  // collective
    if (root) run.params_whole.resize(size_t(run.n_params));
    run.layer_zero->gather_full(run.params_whole.data(), m_whole.data(), v_whole.data(), /*with_state=*/true);
    params = run.params_whole.data();
  } else {
    run.optimizer->gather_state(run.ctx(), root ? m_whole.data() : nullptr, root ? v_whole.data() : nullptr);  // collective
    params = root ? run.download_params() : nullptr;  // every rank holds the same weights
  }
  on_root(run.host(), [&] {
    const std::string path = ulysses::save_checkpoint(run.cfg.checkpoint.dir, run.cfg, run.shape, run.state, params,
                                                      m_whole.data(), v_whole.data(), run.n_params);
    spdlog::info("saved checkpoint {}", path);
  });
  run.params_whole = {};
  if (run.device != Device::cpu) run.params_staging = {};
}

void finish_run(TrainRun& run, int first_step) {
  const Config& cfg = run.cfg;
  if (first_step < cfg.train.max_steps) save_checkpoint(run, cfg.train.max_steps);
  // At ZeRO 2 and 3 the whole fp32 weights exist only as the shards (at ZeRO 2 the model holds
  // them whole on the CPU, but on cuda only as its bf16 compute copy): gather them on rank 0 for
  // the export; at ZeRO 3 also for the sample (which then runs on a whole P = 1 copy on the CPU;
  // at ZeRO 2 the sampler shares the model's whole compute copy)
  const bool exporting = !cfg.checkpoint.export_llmc.empty() || !cfg.checkpoint.export_hf.empty();
  const bool gather_whole = run.per_layer && (exporting || (run.zero_stage == 3 && cfg.train.sample_tokens > 0));
  if (gather_whole) {
    if (run.world().rank() == 0) run.params_whole.resize(size_t(run.n_params));
    run.layer_zero->gather_full(run.params_whole.data(), nullptr, nullptr, /*with_state=*/false);
  }
  const float* final_params = gather_whole ? run.params_whole.data() : nullptr;
  if (exporting) {
    const float* params = gather_whole ? final_params : (run.host().rank() == 0 ? run.download_params() : nullptr);
    on_root(run.host(), [&] {
      if (!cfg.checkpoint.export_llmc.empty()) {
        write_llmc_checkpoint(cfg.checkpoint.export_llmc, llmc_header_for(cfg.model), params, size_t(run.n_params));
        spdlog::info("exported llm.c checkpoint {}", cfg.checkpoint.export_llmc);
      }
      if (!cfg.checkpoint.export_hf.empty()) {
        write_hf_checkpoint(cfg.checkpoint.export_hf, cfg.model, params, size_t(run.n_params));
        spdlog::info("exported Hugging Face GPT-2 checkpoint {} (config.json, model.safetensors)", cfg.checkpoint.export_hf);
      }
    });
  }
  if (cfg.train.sample_tokens <= 0) return;
  on_root(run.host(), [&] {
    std::optional<GPT> whole;
    if (gather_whole && run.zero_stage == 3) {
      whole.emplace(cfg.model, GPTRunShape{1, 1, 1, 0}, Device::cpu, nullptr);
      std::memcpy(whole->params_flat().data, final_params, size_t(run.n_params) * 4);
    }
    spdlog::info("sample ({} tokens, temperature {}):\n{}", cfg.train.sample_tokens, cfg.train.sample_temperature,
                 sample_text(cfg, whole ? *whole : run.model, whole ? Device::cpu : run.device));
  });
}

}  // namespace ulysses
