// Helpers shared by the ZeRO tests: this rank's tokens of a global sequence.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace ulysses::test {

// This rank's tokens of global sequence `s` (the same sequence on every rank of an SP group):
// tokens [sp_rank·N/P, (sp_rank+1)·N/P) of a random sequence seeded by s, their next tokens as
// targets, and their global positions; appended to tok, tgt, pos.
inline void rank_tokens(int64_t s, int N, int V, int P, int sp_rank, std::vector<int32_t>& tok,
                        std::vector<int32_t>& tgt, std::vector<int32_t>& pos) {
  std::mt19937 rng(uint32_t(500 + s));
  std::vector<int32_t> t(size_t(N) + 1);
  for (auto& x : t) x = int32_t(rng() % uint32_t(V));
  const int T = N / P;
  for (int i = sp_rank * T; i < (sp_rank + 1) * T; ++i) {
    tok.push_back(t[size_t(i)]);
    tgt.push_back(t[size_t(i) + 1]);
    pos.push_back(i);
  }
}

}  // namespace ulysses::test
