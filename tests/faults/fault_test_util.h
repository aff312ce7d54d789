// Helpers shared by the in-process fault tests: a scratch directory with the same name on every
// rank, a tiny training config, run_train in-process, and the metrics file's values as text.
#pragma once
#include <mpi.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "comm/bootstrap.h"
#include "core/config.h"
#include "core/base/log.h"
#include "core/trainer.h"
#include "tests/test_util.h"

namespace ulysses::fault_test {

namespace fs = std::filesystem;

// A fresh directory named after rank 0's pid, so every rank of one test run uses the same one.
inline fs::path shared_dir(const std::string& name) {
  long pid = long(::getpid());
  MPI_Bcast(&pid, 1, MPI_LONG, 0, MPI_COMM_WORLD);
  const fs::path p = fs::temp_directory_path() / ("ulysses_test_faults_" + name + "_" + std::to_string(pid));
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    fs::remove_all(p);
    fs::create_directories(p);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return p;
}

inline void remove_shared_dir(const fs::path& p) {
  MPI_Barrier(MPI_COMM_WORLD);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) fs::remove_all(p);
}

// 2 layers, 32 wide, 4 heads, sequences of 32 tokens, synthetic data, one thread per rank.
inline Config tiny_config(const std::vector<std::string>& extra) {
  std::vector<std::string> sets = {"model.n_layer=2",      "model.n_embd=32",         "model.n_head=4",
                                   "model.max_seq_len=64", "train.seq_len=32",        "train.micro_batch_size=2",
                                   "train.max_steps=6",    "train.warmup_steps=2",    "data.source=synthetic",
                                   "runtime.threads=1",    "logging.level=error",     "runtime.comm_timeout=60"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

inline int run(const Config& cfg) {
  int argc = 0;
  char** argv = nullptr;
  MpiRuntime mpi(&argc, &argv);
  init_logging(mpi.world_rank, cfg.logging.level, false);
  return run_train(cfg, mpi);
}

using ulysses::test::field_values;  // tests/test_util.h

}  // namespace ulysses::fault_test
