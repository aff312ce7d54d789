// `ulysses check`: brings up the process groups of the configured layout and exercises every
// collective across the ranks, printing what it found (ranks, hosts, groups, backend, devices).
#pragma once
#include "comm/bootstrap.h"
#include "core/config.h"

namespace ulysses {

// Returns the exit code (0 when every collective gave the expected result on every rank).
int run_comm_check(const Config& cfg, MpiRuntime& mpi);

}  // namespace ulysses
