// Helpers shared by the tests that run under mpirun.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <random>
#include <vector>

namespace ulysses::test {

inline int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// n token ids in [0, V) from a generator seeded with `seed`: the same sequence on every rank
inline std::vector<int32_t> random_tokens(uint32_t seed, size_t n, int V) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(rng() % uint32_t(V));
  return t;
}

}  // namespace ulysses::test
