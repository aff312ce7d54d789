// The training loop: micro-batches with gradient accumulation, AdamW with the LR schedule and
// gradient clipping, validation, metrics, checkpoints, and the final sample.
#pragma once
#include "comm/bootstrap.h"
#include "core/config.h"

namespace ulysses {

// Runs `ulysses train`. Returns the process exit code. Throws UserError for bad input.
int run_train(const Config& cfg, MpiRuntime& mpi);

}  // namespace ulysses
