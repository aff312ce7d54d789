// The Ulysses head plan (who gets which heads, GQA replication, uneven splits) and the
// communication accounting: the bytes the all-to-alls send equal the documented formula.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <random>
#include <set>

#include "comm/groups.h"
#include "comm/ulysses.h"
#include "core/base/error.h"
#include "core/gpt.h"

using namespace ulysses;

TEST_CASE("head plan: even split without GQA", "[sp]") {
  const UlyssesHeadPlan plan = plan_ulysses_heads(8, 8, 4);
  for (int p = 0; p < 4; ++p) {
    CHECK(plan.q_begin[size_t(p)] == 2 * p);
    CHECK(plan.q_count[size_t(p)] == 2);
    CHECK(plan.kv_heads[size_t(p)] == std::vector<int>{2 * p, 2 * p + 1});
  }
  // peer 1 takes q heads 2, 3, k heads 8 + 2, 8 + 3, v heads 16 + 2, 16 + 3 of the packed qkv
  CHECK(std::vector<int32_t>(plan.qkv_heads.begin() + plan.qkv_offsets[1], plan.qkv_heads.begin() + plan.qkv_offsets[2]) ==
        std::vector<int32_t>{2, 3, 10, 11, 18, 19});
}

TEST_CASE("head plan: GQA with fewer kv heads than ranks replicates them", "[sp]") {
  const UlyssesHeadPlan plan = plan_ulysses_heads(8, 2, 4);
  CHECK(plan.kv_heads[0] == std::vector<int>{0});
  CHECK(plan.kv_heads[1] == std::vector<int>{0});
  CHECK(plan.kv_heads[2] == std::vector<int>{1});
  CHECK(plan.kv_heads[3] == std::vector<int>{1});
}

TEST_CASE("head plan: uneven heads and straddling kv groups", "[sp]") {
  const UlyssesHeadPlan plan = plan_ulysses_heads(4, 4, 3);
  CHECK(plan.q_count == std::vector<int>{2, 1, 1});
  CHECK(plan.q_begin == std::vector<int>{0, 2, 3});
  // 8 q heads over 2 kv heads on 3 ranks: rank 1 holds q 3 (kv 0) and q 4, 5 (kv 1): not a
  // uniform grouping, so each local q head gets its own kv slot
  const UlyssesHeadPlan g = plan_ulysses_heads(8, 2, 3);
  CHECK(g.q_count == std::vector<int>{3, 3, 2});
  CHECK(g.kv_heads[0] == std::vector<int>{0});
  CHECK(g.kv_heads[1] == std::vector<int>{0, 1, 1});
  CHECK(g.kv_heads[2] == std::vector<int>{1});
  // every query head is computed exactly once
  std::multiset<int> q(g.out_heads.begin(), g.out_heads.end());
  for (int h = 0; h < 8; ++h) CHECK(q.count(h) == 1);
}

TEST_CASE("head plan: P beyond the query heads is a clear error", "[sp]") {
  CHECK_THROWS_WITH(plan_ulysses_heads(4, 4, 8), Catch::Contains("at most model.n_head = 4"));
}

TEST_CASE("all-to-all bytes per step equal the formula", "[sp]") {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  ModelConfig cfg;
  cfg.n_layer = 3;
  cfg.n_embd = 32;
  cfg.n_head = 4;
  cfg.vocab_size = 50;
  cfg.max_seq_len = 64;
  const int P = world, B = 2, N = 12 * P, T = N / P;
  ProcessGroups groups = make_process_groups(P, CommBackend::mpi);
  GPT model(cfg, {B, N, P, 0}, Device::cpu, groups.sequence.get());
  model.init_weights(1);
  const size_t BT = static_cast<size_t>(B * T);
  std::vector<int32_t> tok(BT), tgt(BT), pos(BT);
  std::mt19937 rng(3);
  for (size_t i = 0; i < tok.size(); ++i) {
    tok[i] = int32_t(rng() % 50);
    tgt[i] = int32_t(rng() % 50);
    pos[i] = int32_t(groups.sp_rank * T + int(i) % T);
  }
  groups.sequence->counters().reset();
  model.zero_grad();
  int64_t count = 0;
  model.forward_backward(tok.data(), tgt.data(), pos.data(), &count);
  const uint64_t measured = groups.sequence->counters().bytes_sent[size_t(Collective::all_to_all)];
  const uint64_t formula = uint64_t(cfg.n_layer) * ulysses_layer_bytes_sent(model.ulysses()->plan(), groups.sp_rank, B, T,
                                                                            cfg.head_dim(), sizeof(float));
  CHECK(measured == formula);
  // with H divisible by P: per layer and rank, (3 + 1) * B * N * C / P elements forward and the
  // same backward, of which (P - 1) / P leave the rank
  const uint64_t paper = uint64_t(cfg.n_layer) * 2 * 4 * B * N * cfg.n_embd / P * (P - 1) / P * sizeof(float);
  if (cfg.n_head % P == 0) CHECK(measured == paper);
  CHECK(groups.sequence->counters().calls[size_t(Collective::all_to_all)] == uint64_t(4 * cfg.n_layer));
}
