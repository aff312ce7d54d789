// The watchdog (comm/watchdog.h) and the stop signals (core/signals.h) in-process:
//   a collective older than the timeout fires once, with collective, group, step and rank in
//   the message; collectives that finish in time never fire; the watched communicator forwards
//   results and byte counters; a stop signal is recorded, agreed over the world, and the
//   previous handler comes back afterwards.
#include <catch2/catch.hpp>
#include <mpi.h>
#include <signal.h>

#include <chrono>
#include <mutex>
#include <thread>
#include <typeinfo>
#include <vector>

#include "comm/groups.h"
#include "comm/watchdog.h"
#include "core/signals.h"

using namespace ulysses;

namespace {
struct Recorder {
  std::mutex m;
  std::vector<std::string> messages;
  Watchdog::AbortFn fn() {
    return [this](const std::string& msg) {
      std::lock_guard<std::mutex> lock(m);
      messages.push_back(msg);
    };
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(m);
    return messages.size();
  }
};
}  // namespace

TEST_CASE("the watchdog aborts a collective that outlives the timeout, naming it", "[faults][watchdog]") {
  Recorder rec;
  const auto t0 = std::chrono::steady_clock::now();
  {
    Watchdog dog(3, /*timeout_s=*/0.3, rec.fn());
    dog.set_step(7);
    dog.enter("all_to_all", "sequence[1]");
    while (rec.count() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK(dog.fired());
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(rec.messages.size() == 1);  // fires once, not on every poll
  CHECK_THAT(rec.messages[0], Catch::Contains("rank 3: all_to_all on group 'sequence[1]' at step 7"));
  CHECK_THAT(rec.messages[0], Catch::Contains("runtime.comm_timeout = 0.3 s"));
  CHECK(waited >= 0.3);
  CHECK(waited < 2.0);  // polled every timeout/10
}

TEST_CASE("collectives that finish in time never fire the watchdog", "[faults][watchdog]") {
  Recorder rec;
  Watchdog dog(0, 0.2, rec.fn());
  const auto t0 = std::chrono::steady_clock::now();
  int calls = 0;
  // 1 s of 20 ms collectives: five times the timeout in total, each well within it
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1)) {
    dog.set_step(calls);
    dog.enter("all_reduce", "world");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    dog.leave();
    ++calls;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // idle (no collective) is fine too
  CHECK(calls > 10);
  CHECK_FALSE(dog.fired());
  CHECK(rec.count() == 0);
}

TEST_CASE("a watched communicator forwards results and byte counters", "[faults][watchdog]") {
  Recorder rec;
  Watchdog dog(0, 60, rec.fn());
  ProcessGroups groups = make_process_groups(1, CommBackend::mpi);
  watch_process_groups(groups, dog);
  Communicator& world = *groups.world;
  REQUIRE(dynamic_cast<WatchedCommunicator*>(&world) != nullptr);
  const int n = world.size(), r = world.rank();
  std::vector<float> x(1000, float(r + 1));
  world.all_reduce(x.data(), x.data(), x.size(), DType::f32, ReduceOp::sum);
  CHECK(x[999] == float(n * (n + 1) / 2));
  CHECK(world.counters().calls[size_t(Collective::all_reduce)] == 1);
  std::vector<int32_t> send(size_t(n) * 3), recv(size_t(n) * 3);
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < 3; ++k) send[size_t(j * 3 + k)] = r * 100 + j * 10 + k;
  world.all_to_all(send.data(), recv.data(), 3, DType::i32);
  for (int i = 0; i < n; ++i) CHECK(recv[size_t(i * 3 + 2)] == i * 100 + r * 10 + 2);
  // bytes that left this rank: (n - 1) blocks of 3 int32
  CHECK(world.counters().bytes_sent[size_t(Collective::all_to_all)] == uint64_t(n - 1) * 12);
  // the nonblocking all_to_allv reaches the wrapped MPI communicator (MPI_Ialltoallv): its
  // request is the wrapped one's, started and waited through the wrapper, counted the same
  std::vector<size_t> counts(static_cast<size_t>(n), 3), displs(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) displs[size_t(j)] = size_t(j) * 3;
  std::fill(recv.begin(), recv.end(), -1);
  std::unique_ptr<CommRequest> request = world.make_request();
  const CommRequest& made = *request;
  REQUIRE(typeid(made) != typeid(CommRequest));  // the MPI backend's own kind
  world.start_all_to_allv(*request, send.data(), counts.data(), displs.data(), recv.data(), counts.data(),
                          displs.data(), DType::i32);
  CHECK(request->in_flight);
  world.wait(*request);
  CHECK_FALSE(request->in_flight);
  for (int i = 0; i < n; ++i) CHECK(recv[size_t(i * 3 + 2)] == i * 100 + r * 10 + 2);
  CHECK(world.counters().bytes_sent[size_t(Collective::all_to_all)] == uint64_t(n - 1) * 24);
  world.counters().reset();
  world.barrier();
  CHECK(world.counters().total_bytes_sent() == 0);
  CHECK_FALSE(dog.fired());
}

TEST_CASE("stop signals are recorded, agreed over the world, and the old handler restored", "[faults][signals]") {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ProcessGroups groups = make_process_groups(1, CommBackend::mpi);
  struct sigaction before {};
  sigaction(SIGUSR1, nullptr, &before);
  {
    StopSignals stop;
    CHECK(stop.pending() == 0);
    CHECK(stop.agree(*groups.world) == 0);
    // only the last rank is signalled: every rank must learn of it
    if (rank == size - 1) raise(SIGUSR1);
    CHECK(stop.pending() == (rank == size - 1 ? SIGUSR1 : 0));
    CHECK(stop.agree(*groups.world) == SIGUSR1);
    if (rank == 0) raise(SIGTERM);  // a later signal does not replace the first
    CHECK(stop.pending() == (rank == size - 1 ? SIGUSR1 : rank == 0 ? SIGTERM : 0));
    CHECK(std::string(signal_name(SIGTERM)) == "SIGTERM");
  }
  struct sigaction after {};
  sigaction(SIGUSR1, nullptr, &after);
  CHECK(after.sa_handler == before.sa_handler);
}
