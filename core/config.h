// The resolved configuration: typed, validated structs filled from YAML (core/config.cpp).
// Every field has a default here; docs/configs.md documents each key. Groups mirror the YAML:
//   model / parallel / train / data / runtime / checkpoint / logging
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ulysses {

struct ModelConfig {
  int n_layer = 2;                 // transformer blocks
  int n_embd = 64;                 // C, the width
  int n_head = 4;                  // H, query heads
  int n_kv_head = 0;               // key/value heads (GQA); 0 means n_head
  int vocab_size = 256;            // V; the embedding is padded to padded_vocab_size()
  int max_seq_len = 256;           // largest N the model accepts (size of learned positions)
  std::string position_embedding = "learned";  // learned | rope
  double rope_theta = 10000.0;
  double init_std = 0.02;          // GPT-2 init; residual projections scaled by 1/sqrt(2L)

  int kv_heads() const { return n_kv_head > 0 ? n_kv_head : n_head; }
  int head_dim() const { return n_embd / n_head; }
  int padded_vocab_size() const { return (vocab_size + 127) / 128 * 128; }
  bool rope() const { return position_embedding == "rope"; }
};

struct ParallelConfig {
  int sequence = 1;                // P: sequence-parallel degree; DP = world size / P
  int emulate_sequence = 0;        // >1: one rank does the work of one rank of a P-rank run
  int zero_stage = 0;              // 0 | 1 | 2 | 3
  std::string backend = "auto";    // auto | mpi | nccl  (auto: nccl on cuda, mpi on cpu)
};

struct TrainConfig {
  int seq_len = 128;               // N, tokens per sequence (all ranks of an SP group together)
  int micro_batch_size = 4;        // B, sequences per rank per micro-step
  int64_t global_batch_tokens = 0; // tokens per optimizer step over all ranks; 0: one micro-step
  int max_steps = 100;
  double lr = 3e-4;
  double min_lr_ratio = 0.1;       // the schedule decays to lr * min_lr_ratio
  int warmup_steps = 10;
  std::string lr_schedule = "cosine";  // cosine | constant | linear
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;          // clip by global norm; 0 disables
  uint64_t seed = 1337;
  int eval_interval = 0;           // steps between validation passes; 0: only at the end
  int eval_steps = 4;              // micro-batches per validation pass
  int sample_tokens = 0;           // tokens generated at the end of training (rank 0 prints)
  double sample_temperature = 1.0;
  int max_skipped_steps = 5;       // consecutive NaN/Inf steps before the job stops
};

struct DataConfig {
  std::vector<std::string> train;  // llm.c token shards (paths or globs)
  std::vector<std::string> val;
  std::string source = "shards";   // shards | synthetic
  bool shuffle = false;            // seeded shuffle of sequence order (per epoch)
  std::string tokenizer = "byte";  // byte | gpt2 (for decoding samples)
  std::string tokenizer_dir;       // for gpt2: holds encoder.json/vocab.json and merges.txt
};

struct RuntimeConfig {
  std::string device = "auto";     // auto | cpu | cuda
  std::string recompute = "none";  // none | selective | full
  std::string offload = "none";    // none | checkpoints (full recompute on cuda: layer outputs in pinned host memory)
  // ZeRO 2 / 3 on cuda: the per-layer gathers and reduce-scatters on a communication stream of
  // their own, overlapped with the layers' compute (core/zero3.h); needs device cuda
  bool overlap_comm = false;
  int tile_tokens = 0;             // MLP / LM-head chunk in tokens; 0: untiled
  // the Ulysses all-to-alls in this many chunks of each rank's seq_len / P tokens, pipelined with
  // the GEMMs beside them (comm/ulysses.h); 1: whole, no pipeline. No effect at P = 1.
  int all_to_all_chunks = 1;
  std::string attention = "auto";  // auto | flash | cudnn (cuda only; see uses_cudnn_attention)
  int threads = 0;                 // OpenMP threads per rank; 0: cores / local ranks
  double comm_timeout = 300.0;     // seconds before a stuck collective aborts the job
  // Testing aid (docs/reliability.md): poison one gradient with NaN on the last rank at steps
  // debug_inject_nan_step .. + debug_inject_nan_steps - 1 (1-based); 0: off.
  int debug_inject_nan_step = 0;
  int debug_inject_nan_steps = 1;
};

struct CheckpointConfig {
  std::string dir;                 // empty: no checkpoints
  int interval = 0;                // steps between saves; 0: only at the end (when dir is set)
  int keep_last = 3;
  std::string resume;              // "" | auto | path of a checkpoint directory
  std::string init_from;           // llm.c .bin, or Hugging Face GPT-2 dir / .safetensors (core/hf.h)
  std::string export_llmc;         // write llm.c format here at the end
  std::string export_hf;           // write a Hugging Face GPT-2 directory here at the end
};

struct LoggingConfig {
  std::string level = "info";      // trace | debug | info | warn | error
  int interval = 1;                // steps between progress lines
  std::string metrics_file;        // JSON lines, one object per step (rank 0)
  bool all_ranks = false;          // info lines from every rank, not only rank 0
};

struct Config {
  ModelConfig model;
  ParallelConfig parallel;
  TrainConfig train;
  DataConfig data;
  RuntimeConfig runtime;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  std::string source;              // where it came from: a path, or "<embedded default>"
  // What the loader decided or let pass that the user should hear about: a source it chose, a key
  // made moot by a later --set (docs/configs.md, "Keys without effect"). Rank 0 logs them as
  // warnings at start-up; not part of the YAML.
  std::vector<std::string> notes;
};

// runtime.attention on cuda: cudnn, or auto with a head_dim the flash kernels do not take
// (they take 64 and 128; cuDNN SDPA any multiple of 8 up to 128).
inline bool uses_cudnn_attention(const Config& c) {
  const int d = c.model.head_dim();
  return c.runtime.attention == "cudnn" || (c.runtime.attention == "auto" && d != 64 && d != 128);
}

// Loads `path` (empty: the embedded default), applies `overrides` ("key.path=value", YAML
// scalar syntax), validates everything that does not need the world size. Throws UserError
// naming the file, line and column, key and the expectation.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, from YAML text already in memory (tests); `source` is used in messages.
Config load_config_string(const std::string& yaml, const std::string& source,
                          const std::vector<std::string>& overrides = {});
// Checks that need the world size: P divides it, DP×SP layout, batch arithmetic.
void validate_for_world(const Config& c, int world_size);
// Settings that the device and backend the job got, or its world size, make moot (runtime.attention
// when auto chose the CPU, ZeRO on one rank, overlap on the blocking staged MPI backend): one
// line each, for rank 0 to log as a warning at start-up. `cuda`: the model runs on GPUs; `nccl`:
// the collectives are NCCL's (else MPI, staged through host memory on cuda).
std::vector<std::string> inert_at_start(const Config& c, bool cuda, bool nccl, int world_size);
// The fully resolved config as YAML; load_config_string(to_yaml(c)) gives back c.
std::string to_yaml(const Config& c);

}  // namespace ulysses
