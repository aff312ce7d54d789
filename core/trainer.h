// The training loop: micro-batches with gradient accumulation, AdamW with the LR schedule and
// gradient clipping, validation, metrics, checkpoints, and the final sample.
#pragma once
#include "comm/bootstrap.h"
#include "comm/groups.h"
#include "core/config.h"

namespace ulysses {

// What every subcommand that runs the model does first, once the device plan is agreed: OpenMP
// threads per rank (runtime.threads, 0: the node's cores / local ranks) and, on rank 0, a warning
// for each setting the device, backend or world size makes moot (inert_at_start, core/config.h).
void start_rank(const Config& cfg, const DevicePlan& plan, const MpiRuntime& mpi);

// Runs `ulysses train`. Returns the process exit code. Throws UserError for bad input.
//
// dump_path non-empty: `ulysses dump` instead of training. The run is set up as for training
// (layout, initial weights from checkpoint.init_from / resume / the seed, the data), then the
// first training micro-batch goes through one forward + backward and rank 0 writes dump_path, an
// F32 safetensors file (core/hf.h) with
//   tokens [B, N]    the micro-batch's tokens (exact as floats)
//   targets [B, N]   their targets (the next tokens; < 0: ignored)
//   logits [B, N, V] fp32, the padding columns dropped, gathered over the SP ranks
//   loss   []        the mean cross-entropy over the micro-batch's tokens
//   grad.<HF name>   the gradient of that mean loss for every parameter, in Hugging Face GPT-2
//                    names and layout (transformer.h.0.attn.c_attn.weight, ...; hf_gpt2_tensors)
// No optimizer step is taken and nothing else is written. Needs DP = 1, ZeRO stage 0 or 1 and
// runtime.overlap_comm false.
int run_train(const Config& cfg, MpiRuntime& mpi, const std::string& dump_path = "");

}  // namespace ulysses
