// Checkpoints: save, find, load. A checkpoint is a directory <dir>/step_NNNNNNNN/ holding
//   model.bin      header + fp32 parameters (llm.c order, see core/gpt.h)
//   optimizer.bin  header + AdamW m and v (fp32)
//   state.yaml     step, data position, seed, the world layout, the resolved config
//   manifest.yaml  size and xxh64 of every file above; written last
// It is written into <dir>/.tmp-step_NNNNNNNN, every file and the directory are fsynced, and a
// rename publishes it, so a crash mid-save never leaves a half checkpoint under a real name.
// A directory without a valid manifest (or with a checksum mismatch) is never loaded.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/data.h"
#include "core/gpt.h"

namespace ulysses {

struct TrainState {
  int step = 0;                // optimizer steps completed
  DataState data;              // the training loader's position
  int skipped_in_a_row = 0;    // consecutive skipped (non-finite) steps
  // layout it was written with (information; any layout can load a ZeRO-0 checkpoint)
  int world_size = 1, sequence_parallel = 1, zero_stage = 0;
};

// Writes the checkpoint for `state` (host buffers: params, m, v of n floats each). Returns the
// published directory. Keeps the newest `cfg.checkpoint.keep_last` checkpoints. Throws
// UserError (naming the path) when the directory cannot be created or written, e.g. disk full;
// the previous checkpoints are untouched then.
std::string save_checkpoint(const std::string& dir, const Config& cfg, const GPTShape& shape,
                            const TrainState& state, const float* params, const float* m,
                            const float* v, int64_t n);

// Checks a checkpoint directory's manifest and checksums. Returns an empty string when it is
// valid, otherwise what is wrong ("manifest.yaml missing", "model.bin: checksum mismatch", ...).
std::string verify_checkpoint(const std::string& path);

// The newest valid checkpoint under `dir` (warns, naming each invalid one it skips); nullopt if
// there is none.
std::optional<std::string> find_latest_checkpoint(const std::string& dir);

// Resolves checkpoint.resume: "" -> nullopt; "auto" -> the newest valid checkpoint under
// checkpoint.dir (nullopt if none: a fresh start); a path -> that checkpoint (UserError if it
// is invalid).
std::optional<std::string> resolve_resume(const CheckpointConfig& c);

// Loads into host buffers; UserError naming the file for a wrong magic, a truncated file, or
// shapes that disagree with `shape` (naming the field). m and v may be null (weights only).
TrainState load_checkpoint(const std::string& path, const GPTShape& shape, float* params, float* m, float* v,
                           int64_t n);

}  // namespace ulysses
