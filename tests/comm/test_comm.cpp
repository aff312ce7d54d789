// The MPI backend, the bootstrap and the process groups, run under mpirun with 1, 2 and 4 ranks.
// Collectives are checked against serial references (tests/comm/collective_cases.h); the
// large-count paths (MPI_Alltoallw with derived datatypes, chunked reductions and broadcasts)
// are exercised on small buffers by lowering the communicator's int limit.
#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include <mpi.h>
#include <spdlog/spdlog.h>

#include "comm/bootstrap.h"
#include "comm/comm_check.h"
#include "comm/groups.h"
#include "comm/mpi_communicator.h"
#include "core/base/error.h"
#include "tests/comm/collective_cases.h"

using namespace ulysses;
using namespace ulysses::test;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

}  // namespace

TEST_CASE("bootstrap: world and node-local ranks agree with MPI", "[comm][bootstrap]") {
  MpiRuntime mpi(nullptr, nullptr);  // MPI is already up (tests/test_main.cpp)
  CHECK_FALSE(mpi.owns_mpi);
  CHECK(mpi.world_rank == world_rank());
  CHECK(mpi.world_size == world_size());
  REQUIRE_FALSE(mpi.hostname.empty());
  // On every host, the local ranks are 0..k-1, each once, and k is every one's local_size.
  char host[MPI_MAX_PROCESSOR_NAME] = {};
  std::snprintf(host, sizeof(host), "%s", mpi.hostname.c_str());
  std::vector<char> hosts(size_t(mpi.world_size) * sizeof(host));
  std::vector<int> local(size_t(mpi.world_size) * 2);
  int mine[2] = {mpi.local_rank, mpi.local_size};
  MPI_Allgather(host, int(sizeof(host)), MPI_CHAR, hosts.data(), int(sizeof(host)), MPI_CHAR,
                MPI_COMM_WORLD);
  MPI_Allgather(mine, 2, MPI_INT, local.data(), 2, MPI_INT, MPI_COMM_WORLD);
  std::string my_host(host);
  std::set<int> seen;
  int on_my_host = 0;
  for (int r = 0; r < mpi.world_size; r++) {
    if (std::string(&hosts[size_t(r) * sizeof(host)]) != my_host) continue;
    on_my_host++;
    seen.insert(local[size_t(r) * 2]);
    CHECK(local[size_t(r) * 2 + 1] == mpi.local_size);
  }
  CHECK(on_my_host == mpi.local_size);
  CHECK(int(seen.size()) == mpi.local_size);
  CHECK(*seen.begin() == 0);
  CHECK(*seen.rbegin() == mpi.local_size - 1);
}

TEST_CASE("bootstrap: CUDA device selection without CUDA", "[comm][bootstrap]") {
  MpiRuntime mpi(nullptr, nullptr);
  if (cuda_device_count() > 0) return;  // covered by test_comm_nccl on a GPU machine
  CHECK(cuda_device_count() == 0);
  CHECK_THROWS_AS(select_cuda_device(mpi, true), UserError);
  CHECK_THROWS_AS(select_cuda_device(mpi, false), UserError);
}

TEST_CASE("mpi communicator: every collective against the serial reference", "[comm][mpi]") {
  auto c = make_mpi_communicator(MPI_COMM_WORLD, "world");
  REQUIRE(c->backend() == CommBackend::mpi);
  REQUIRE(c->rank() == world_rank());
  REQUIRE(c->size() == world_size());
  HostMemory host;
  check_every_collective(*c, host);
}

TEST_CASE("mpi communicator: large-count paths (int limit lowered to 3 elements)",
          "[comm][mpi][large]") {
  auto owned = make_mpi_communicator(MPI_COMM_WORLD, "world");
  auto& c = dynamic_cast<MpiCommunicator&>(*owned);
  c.set_max_int_count(3);  // every count above 3 now takes the path used above INT_MAX
  HostMemory host;
  check_every_collective(c, host);
}

TEST_CASE("mpi communicator: all_to_allv takes one path on every rank when only one rank's "
          "displacements pass the int limit", "[comm][mpi][large]") {
  auto owned = make_mpi_communicator(MPI_COMM_WORLD, "world");
  auto& c = dynamic_cast<MpiCommunicator&>(*owned);
  const int P = c.size(), me = c.rank();
  c.set_max_int_count(size_t(P) + 1);
  // one element to every peer; rank 0 receives them 10 apart (displacements up to 10 (P - 1),
  // past the limit from 2 ranks on), the others side by side (at most P - 1, within it)
  const size_t stride = me == 0 ? 10 : 1, n = static_cast<size_t>(P);
  std::vector<size_t> ones(n, 1), send_displs(n), recv_displs(n);
  std::vector<int32_t> send(n), recv(n * stride, -1);
  for (int j = 0; j < P; ++j) {
    send_displs[size_t(j)] = size_t(j);
    recv_displs[size_t(j)] = size_t(j) * stride;
    send[size_t(j)] = 100 * me + j;
  }
  for (int rep = 0; rep < 2; ++rep) {  // the blocking and the nonblocking call
    std::fill(recv.begin(), recv.end(), -1);
    if (rep == 0) {
      c.all_to_allv(send.data(), ones.data(), send_displs.data(), recv.data(), ones.data(), recv_displs.data(),
                    DType::i32);
    } else {
      auto request = c.make_request();
      c.start_all_to_allv(*request, send.data(), ones.data(), send_displs.data(), recv.data(), ones.data(),
                          recv_displs.data(), DType::i32);
      c.wait(*request);
    }
    for (int j = 0; j < P; ++j) CHECK(recv[size_t(j) * stride] == 100 * j + me);
  }
  c.barrier();
}

TEST_CASE("mpi communicator: byte counters", "[comm][mpi][counters]") {
  auto c = make_mpi_communicator(MPI_COMM_WORLD, "world");
  HostMemory host;
  check_counters(*c, host);
}

TEST_CASE("mpi communicator: errors are CommErrors naming collective, group and rank",
          "[comm][mpi][errors]") {
  auto c = make_mpi_communicator(MPI_COMM_WORLD, "world");
  const std::string where =
      fmt::format("on group 'world' rank {}/{}", c->rank(), c->size());
  std::vector<uint16_t> a(16, 1), b(16, 0);
  // Reductions on bf16 / u16 are refused (the same decision on every rank, so nobody hangs).
  try {
    c->all_reduce(a.data(), b.data(), 4, DType::bf16, ReduceOp::sum);
    FAIL("bf16 all_reduce did not throw");
  } catch (const CommError& e) {
    CHECK_THAT(e.what(), Catch::Contains("mpi all_reduce " + where) && Catch::Contains("unsupported"));
  }
  CHECK_THROWS_AS(c->reduce_scatter(a.data(), b.data(), 1, DType::u16, ReduceOp::max), CommError);
  std::vector<int32_t> ia(8, 1), ib(8, 0);
  CHECK_THROWS_WITH(c->all_reduce(ia.data(), ib.data(), 8, DType::i32, ReduceOp::avg),
                    Catch::Contains("avg needs f32 or f64"));
  CHECK_THROWS_WITH(c->broadcast(ia.data(), 1, DType::i32, c->size()),
                    Catch::Contains("mpi broadcast " + where) && Catch::Contains("root"));
  CHECK_THROWS_WITH(c->all_to_all(ia.data(), ia.data(), 1, DType::i32),
                    Catch::Contains("overlap"));
  // An error MPI itself returns (MPI_ERRORS_RETURN): a message longer than the receive
  // block. Only on one rank, where the peer is this rank itself and no one else waits.
  if (c->size() == 1) {
    size_t send_count = 4, recv_count = 2, displ = 0;
    try {
      c->all_to_allv(ia.data(), &send_count, &displ, ib.data(), &recv_count, &displ, DType::i32);
      FAIL("truncated all_to_allv did not throw");
    } catch (const CommError& e) {
      CHECK_THAT(e.what(), Catch::Contains("mpi all_to_allv on group 'world' rank 0/1: MPI_ERR"));
    }
  }
  c->barrier();  // everybody is still in step
}

TEST_CASE("process groups: layout for every P that divides the world", "[comm][groups]") {
  const int world = world_size(), me = world_rank();
  for (int P : {1, 2, 4}) {
    if (world % P != 0) continue;
    DYNAMIC_SECTION("P = " << P) {
      ProcessGroups g = make_process_groups(P, CommBackend::mpi);
      const int DP = world / P;
      CHECK(g.world_rank == me);
      CHECK(g.world_size == world);
      CHECK(g.sp_size == P);
      CHECK(g.dp_size == DP);
      CHECK(g.sp_rank == me % P);
      CHECK(g.dp_rank == me / P);
      CHECK(g.world->name() == "world");
      CHECK(g.sequence->name() == "sequence[" + std::to_string(me / P) + "]");
      CHECK(g.data->name() == "data[" + std::to_string(me % P) + "]");
      CHECK(g.world->rank() == me);
      CHECK(g.sequence->rank() == g.sp_rank);
      CHECK(g.sequence->size() == P);
      CHECK(g.data->rank() == g.dp_rank);
      CHECK(g.data->size() == DP);
      // Membership: gather the world ranks of each group, in group-rank order.
      std::vector<int32_t> seq(static_cast<size_t>(P)), data(static_cast<size_t>(DP));
      int32_t w = me;
      g.sequence->all_gather(&w, seq.data(), 1, DType::i32);
      g.data->all_gather(&w, data.data(), 1, DType::i32);
      for (int i = 0; i < P; i++) CHECK(seq[size_t(i)] == (me / P) * P + i);
      for (int i = 0; i < DP; i++) CHECK(data[size_t(i)] == me % P + i * P);
      // A collective on the sequence group sums only its members.
      double sum = 0;
      double mine = double(me);
      g.sequence->all_reduce(&mine, &sum, 1, DType::f64, ReduceOp::sum);
      const int first = (me / P) * P;
      CHECK(sum == double(P * first + P * (P - 1) / 2));
    }
  }
}

TEST_CASE("process groups: P that does not divide the world is a UserError", "[comm][groups]") {
  const int world = world_size();
  for (int P : {0, -2, world + 1, 3 * world}) {
    if (P > 0 && world % P == 0) continue;
    CAPTURE(P);
    CHECK_THROWS_AS(make_process_groups(P, CommBackend::mpi), UserError);
  }
  try {
    make_process_groups(world + 1, CommBackend::mpi);
    FAIL("no error");
  } catch (const UserError& e) {
    std::string valid;
    for (int d = 1; d <= world; d++)
      if (world % d == 0) valid += (valid.empty() ? "" : ", ") + std::to_string(d);
    CHECK_THAT(e.what(), Catch::Contains("parallel.sequence = " + std::to_string(world + 1)) &&
                             Catch::Contains("world size " + std::to_string(world)) &&
                             Catch::Contains("expected one of " + valid));
  }
#ifndef ULYSSES_CUDA
  CHECK_THROWS_AS(make_process_groups(1, CommBackend::nccl), UserError);
#endif
}

TEST_CASE("comm check: passes for every valid P on the MPI backend", "[comm][check]") {
  MpiRuntime mpi(nullptr, nullptr);
  auto level = spdlog::get_level();
  spdlog::set_level(spdlog::level::warn);
  for (int P : {1, 2, 4}) {
    if (mpi.world_size % P != 0) continue;
    CommCheckOptions opt;
    opt.sequence = P;
    opt.backend = "mpi";
    CAPTURE(P);
    CHECK(run_comm_check(opt, mpi) == 0);
  }
  CommCheckOptions bad;
  bad.backend = "gloo";
  CHECK_THROWS_WITH(run_comm_check(bad, mpi), Catch::Contains("parallel.backend"));
  spdlog::set_level(level);
}
