// runtime.all_to_all_chunks: the chunked, pipelined all-to-alls (comm/ulysses.h) reproduce the
// losses and gradients of the whole all-to-alls on the CPU, for 10 training steps. Both models
// run side by side on the same sequence communicator and the same data (this rank's slice of B
// sequences): GQA and uneven heads, T = N/P not divisible by K, RoPE and learned positions,
// recompute none and full. The bytes sent are those of K = 1, in B*K times the calls; and a wrong
// chunk displacement, planted through the test hook, breaks the equivalence.
//
// Not bitwise: the data movement is (the pack / unpack ops move the same elements, rope is per
// row, the weight-gradient GEMMs are the same calls over all rows; tests/kernels checks the
// first two), but OpenBLAS's sgemm on a subset of M rows does not round every output row as the
// call on all rows does (it picks kernels and blocking by M), so the per-chunk qkv, attproj and
// dinp GEMMs differ from K = 1 in the last bits. The bound, at the same parameters every step:
// the loss within 1e-7 relative and the gradients within 2e-6 of their largest magnitude (the
// measured differences are printed).
#include <catch2/catch.hpp>
#include <mpi.h>

#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "comm/groups.h"
#include "comm/mpi_communicator.h"
#include "comm/ulysses.h"
#include "core/gpt.h"
#include "core/optimizer.h"
#include "tests/test_util.h"
#include "tests/mpi_test_util.h"

using namespace ulysses;
using ulysses::test::world_size;

namespace {

struct ChunkCase {
  const char* name;
  int P;
  int heads, kv_heads;
  const char* positions;
};

// every case with N = 20: T = 10 (P = 2) or 5 (P = 4), so K = 3 (and K = 2 at P = 4) leaves
// chunks of unequal length
const ChunkCase kCases[] = {
    {"P=2, RoPE + GQA 8 q / 2 kv", 2, 8, 2, "rope"},
    {"P=2, learned, 3 heads (uneven)", 2, 3, 3, "learned"},
    {"P=4, RoPE + GQA 8 q / 2 kv", 4, 8, 2, "rope"},
    {"P=4, learned, 6 heads (uneven)", 4, 6, 6, "learned"},
};

constexpr double kLossTolerance = 1e-7;  // relative, per step
constexpr double kGradTolerance = 2e-6;  // relative to the largest gradient, per step

struct Outcome {
  bool losses_bitwise = true;
  bool grads_bitwise = true;
  double max_loss_rel = 0;       // |loss_K - loss_1| / |loss_1|, over the steps
  double max_grad_rel = 0;       // max |g_K - g_1| / max |g_1|, over the steps
  bool bytes_equal = true;       // all-to-all bytes sent, per step
  bool calls_times_chunks = true;  // all-to-all calls = B*K x those of K = 1
};

std::vector<int32_t> sequence_tokens(int64_t s, int N, int V) {
  return test::random_tokens(uint32_t(7000 + s), size_t(N) + 1, V);
}

// plant: chunk 1 of the #1 forward exchange receives peer (rank + 1) % P's rows where chunk 0's
// go (and leaves its own place stale)
Outcome run_pair(const ChunkCase& c, Recompute recompute, int K, bool plant_wrong_displacement) {
  ModelConfig cfg;
  cfg.n_layer = 2;
  cfg.n_embd = 48;
  cfg.n_head = c.heads;
  cfg.n_kv_head = c.kv_heads;
  cfg.vocab_size = 97;
  cfg.max_seq_len = 64;
  cfg.position_embedding = c.positions;
  const int N = 20, B = 2, steps = 10;
  ProcessGroups groups = make_process_groups(c.P, CommBackend::mpi);
  Communicator& seq = *groups.sequence;
  const int T = N / c.P;
  GPTRunShape whole{B, N, c.P, 0, recompute};
  GPTRunShape chunked = whole;
  chunked.all_to_all_chunks = K;
  GPT m1(cfg, whole, Device::cpu, &seq);
  GPT mk(cfg, chunked, Device::cpu, &seq);
  REQUIRE(mk.ulysses()->num_chunks() == B * K);
  if (plant_wrong_displacement) {
    const int peer = (seq.rank() + 1) % c.P;
    auto& c0 = mk.ulysses()->mutable_chunk_counts_for_testing(UlyssesAllToAll::qkv_forward, 0);
    auto& c1 = mk.ulysses()->mutable_chunk_counts_for_testing(UlyssesAllToAll::qkv_forward, 1);
    c1.recv_displs[size_t(peer)] = c0.recv_displs[size_t(peer)];
  }
  m1.init_weights(11);
  mk.init_weights(11);
  TrainConfig t;
  t.lr = 1e-3;
  t.weight_decay = 0.1;
  AdamW o1(t, m1.shape(), Device::cpu);
  const int64_t n = m1.grads_flat().numel();
  const size_t a2a = size_t(Collective::all_to_all);

  Outcome r;
  for (int step = 0; step < steps; ++step) {
    std::vector<int32_t> tok, tgt, pos;
    for (int i = 0; i < B; ++i) {
      const auto s = sequence_tokens(int64_t(step) * B + i, N, cfg.vocab_size);
      for (int p = groups.sp_rank * T; p < (groups.sp_rank + 1) * T; ++p) {
        tok.push_back(s[size_t(p)]);
        tgt.push_back(s[size_t(p) + 1]);
        pos.push_back(p);
      }
    }
    m1.zero_grad();
    mk.zero_grad();
    int64_t count1 = 0, countk = 0;
    seq.counters().reset();
    const double loss1 = m1.forward_backward(tok.data(), tgt.data(), pos.data(), &count1);
    const CommCounters c1 = seq.counters();
    seq.counters().reset();
    const double lossk = mk.forward_backward(tok.data(), tgt.data(), pos.data(), &countk);
    const CommCounters ck = seq.counters();
    REQUIRE(count1 == countk);
    r.losses_bitwise = r.losses_bitwise && std::memcmp(&loss1, &lossk, sizeof(double)) == 0;
    r.max_loss_rel = std::max(r.max_loss_rel, std::abs(lossk - loss1) / std::abs(loss1));
    r.grads_bitwise =
        r.grads_bitwise && std::memcmp(m1.grads_flat().data, mk.grads_flat().data, size_t(n) * sizeof(float)) == 0;
    r.max_grad_rel = std::max(r.max_grad_rel, test::max_rel_diff(mk.grads_flat().f32(), m1.grads_flat().f32(), n));
    r.bytes_equal = r.bytes_equal && c1.bytes_sent[a2a] == ck.bytes_sent[a2a] && c1.bytes_sent[a2a] > 0;
    r.calls_times_chunks = r.calls_times_chunks && ck.calls[a2a] == c1.calls[a2a] * uint64_t(B * K);
    // m1 trains; mk takes its parameters, so each step compares gradients at the same point
    // (separate optimizers would let Adam's 1/sqrt(v) blow rounding-level differences up in
    // near-zero gradients, which says nothing about the all-to-alls)
    o1.update(m1.context(), m1.params_flat(), m1.grads_flat(), float(t.lr), float(1.0 / double(count1)), step + 1);
    std::memcpy(mk.params_flat().data, m1.params_flat().data, size_t(m1.params_flat().numel()) * sizeof(float));
  }
  // every rank must agree
  int flags[4] = {r.losses_bitwise, r.grads_bitwise, r.bytes_equal, r.calls_times_chunks};
  MPI_Allreduce(MPI_IN_PLACE, flags, 4, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  r.losses_bitwise = flags[0], r.grads_bitwise = flags[1], r.bytes_equal = flags[2], r.calls_times_chunks = flags[3];
  double worst[2] = {r.max_loss_rel, r.max_grad_rel};
  MPI_Allreduce(MPI_IN_PLACE, worst, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  r.max_loss_rel = worst[0], r.max_grad_rel = worst[1];
  return r;
}

}  // namespace

TEST_CASE("chunked all-to-alls reproduce the losses and gradients of whole ones", "[sp][chunks]") {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  for (const ChunkCase& c : kCases) {
    if (c.P != world_size()) continue;
    for (const Recompute rc : {Recompute::none, Recompute::full}) {
      for (const int K : {2, 3}) {
        DYNAMIC_SECTION(c.name << ", recompute " << recompute_name(rc) << ", K = " << K) {
          const Outcome r = run_pair(c, rc, K, false);
          if (rank == 0)
            std::printf("all_to_all_chunks | %-32s | recompute %-4s | K=%d | max loss rel diff %.3e (bitwise %d) | "
                        "max grad rel diff %.3e (bitwise %d)\n",
                        c.name, recompute_name(rc), K, r.max_loss_rel, int(r.losses_bitwise), r.max_grad_rel,
                        int(r.grads_bitwise));
          CHECK(r.max_loss_rel <= kLossTolerance);
          CHECK(r.max_grad_rel <= kGradTolerance);
          CHECK(r.bytes_equal);
          CHECK(r.calls_times_chunks);
        }
      }
    }
  }
}

TEST_CASE("a wrong chunk displacement breaks the chunked equivalence", "[sp][chunks]") {
  for (const ChunkCase& c : kCases) {
    if (c.P != world_size()) continue;
    const Outcome r = run_pair(c, Recompute::none, 3, true);
    INFO("max loss rel diff " << r.max_loss_rel << ", max grad rel diff " << r.max_grad_rel);
    // far outside the tolerances, not rounding: rows of q, k, v in the wrong place
    CHECK(r.max_loss_rel > 100 * kLossTolerance);
    CHECK(r.max_grad_rel > 100 * kGradTolerance);
    break;  // one layout is enough to show the test bites
  }
}

// The nonblocking all_to_allv the CPU pipeline runs on (comm/mpi_communicator.h): several in
// flight at once, started and waited in order, deliver what the blocking call delivers, also on the
// large-count path (max_int_count lowered: the blocking Alltoallw, complete at start); the bytes
// are counted; a request is refused while in flight or by another communicator.
TEST_CASE("MpiCommunicator: nonblocking all_to_allv equals the blocking one", "[sp][chunks][comm]") {
  MpiCommunicator comm(MPI_COMM_WORLD, "world-nb");
  MpiCommunicator other(MPI_COMM_WORLD, "other");
  const int P = comm.size(), rank = comm.rank();
  // peer j gets (j + 1) * 3 elements from every rank; 3 requests over disjoint thirds of the buffers
  const int parts = 3;
  const size_t np = static_cast<size_t>(P);
  std::vector<size_t> sc(np), sd(np), rc(np), rd(np);
  size_t send_total = 0, recv_total = 0;
  for (int j = 0; j < P; ++j) {
    sc[size_t(j)] = size_t(j + 1) * 3, sd[size_t(j)] = send_total, send_total += sc[size_t(j)];
    rc[size_t(j)] = size_t(rank + 1) * 3, rd[size_t(j)] = recv_total, recv_total += rc[size_t(j)];
  }
  for (const size_t max_int : {size_t(INT_MAX), size_t(2)}) {
    CAPTURE(max_int);
    comm.set_max_int_count(max_int);
    std::vector<float> send(send_total * parts);
    for (size_t i = 0; i < send.size(); ++i) send[i] = float(rank * 100000 + int(i));
    std::vector<float> blocking(recv_total * parts, -1.f), nonblocking(recv_total * parts, -1.f);
    std::vector<std::unique_ptr<CommRequest>> requests;
    for (int k = 0; k < parts; ++k) requests.push_back(comm.make_request());
    auto shifted = [](std::vector<size_t> d, size_t by) {
      for (size_t& x : d) x += by;
      return d;
    };
    comm.counters().reset();
    for (int k = 0; k < parts; ++k) {
      const auto sdk = shifted(sd, send_total * k), rdk = shifted(rd, recv_total * k);
      comm.all_to_allv(send.data(), sc.data(), sdk.data(), blocking.data(), rc.data(), rdk.data(), DType::f32);
    }
    const CommCounters after_blocking = comm.counters();
    comm.counters().reset();
    std::vector<std::vector<size_t>> sds, rds;  // kept alive until the waits
    for (int k = 0; k < parts; ++k) {
      sds.push_back(shifted(sd, send_total * k));
      rds.push_back(shifted(rd, recv_total * k));
      comm.start_all_to_allv(*requests[size_t(k)], send.data(), sc.data(), sds.back().data(), nonblocking.data(),
                             rc.data(), rds.back().data(), DType::f32);
    }
    CHECK(requests[0]->in_flight);
    CHECK_THROWS_AS(comm.start_all_to_allv(*requests[0], send.data(), sc.data(), sd.data(), nonblocking.data(),
                                           rc.data(), rd.data(), DType::f32),
                    CommError);
    for (int k = 0; k < parts; ++k) comm.wait(*requests[size_t(k)]);
    CHECK_FALSE(requests[0]->in_flight);
    CHECK(std::memcmp(blocking.data(), nonblocking.data(), blocking.size() * sizeof(float)) == 0);
    // block j of part k came from rank j: its first element is rank j's element at the matching place
    CHECK(nonblocking[rd[0]] == float(0 * 100000 + int(sd[size_t(rank)])));
    CHECK(comm.counters().bytes_sent == after_blocking.bytes_sent);
    CHECK(comm.counters().calls == after_blocking.calls);
    // a request of another communicator is refused (before anything is sent)
    auto foreign = other.make_request();
    CHECK_THROWS_AS(comm.start_all_to_allv(*foreign, send.data(), sc.data(), sd.data(), nonblocking.data(), rc.data(),
                                           rd.data(), DType::f32),
                    CommError);
  }
}
