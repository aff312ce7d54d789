// Graceful stop on SIGTERM, SIGUSR1 (what SLURM sends before preemption) and SIGINT.
//
// The handler only records which signal arrived (a sig_atomic_t store: async-signal-safe). The
// trainer polls at each step boundary and all ranks agree with one all-reduce(max) of the
// pending signal over the world, so a signal delivered to any one rank stops every rank after
// the same step: the step finishes, a checkpoint is written, and the job exits 0.
// A second SIGINT (Ctrl-C twice) ends the process at once with exit code 130.
//
// The recorded signal is process-wide state (a signal handler has nowhere else to write it), so
// at most one StopSignals may exist at a time; it restores the previous handlers when destroyed.
#pragma once
#include "comm/communicator.h"

namespace ulysses {

class StopSignals {
 public:
  StopSignals();   // installs the handlers (SA_RESTART: interrupted system calls resume)
  ~StopSignals();  // restores the handlers that were there before
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The first stop signal received by this process (SIGTERM, SIGUSR1 or SIGINT), 0 if none.
  int pending() const;

  // Collective over `world`: the largest signal number pending on any rank, 0 if none. Every
  // rank must call it at the same point (the trainer calls it once per step).
  int agree(Communicator& world) const;
};

// "SIGTERM", "SIGUSR1", "SIGINT", or "a signal" for any other number.
const char* signal_name(int signo);

}  // namespace ulysses
