// `ulysses check`: brings up the process groups of the configured layout and exercises every
// collective across the ranks, printing what it found (ranks, hosts, groups, backend, devices).
#pragma once
#include "comm/bootstrap.h"
#include <string>

namespace ulysses {

// What the check needs of the config (apps/main.cpp fills it from the resolved config; comm/
// reads no config itself).
struct CommCheckOptions {
  std::string device = "auto";   // runtime.device: auto | cpu | cuda
  std::string backend = "auto";  // parallel.backend: auto | mpi | nccl
  int sequence = 1;              // parallel.sequence: the SP group size (divides the world size)
};

// Returns the exit code (0 when every collective gave the expected result on every rank).
int run_comm_check(const CommCheckOptions& opt, MpiRuntime& mpi);

}  // namespace ulysses
