// Hang detection: a watchdog thread per rank that aborts the job when a collective has not
// finished within runtime.comm_timeout seconds (a peer died, hung, or took another code path).
//
// The rank's main thread marks "entering collective X on group G" and "left" through a
// WatchedCommunicator, which wraps each of the process groups' communicators. The hot path is a
// few relaxed atomic stores and one steady_clock read per collective: no lock, no allocation.
// The watchdog thread wakes every min(1 s, timeout / 10); when the collective in progress is
// older than the timeout it logs
//   watchdog: rank R: <collective> on group '<G>' at step S has not finished after T s ...
// to stderr and calls the abort function (default: MPI_Abort(MPI_COMM_WORLD, kExitCommTimeout)),
// so mpirun / srun end every rank and exit non-zero instead of hanging forever.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "comm/communicator.h"
#include "comm/groups.h"

namespace ulysses {

// Exit code of a job ended by the watchdog (0 ok, 1 internal error, 2 bad input: apps/main.cpp).
constexpr int kExitCommTimeout = 3;

class Watchdog {
 public:
  // Called once, from the watchdog thread, with the message; must not return normally in
  // production (the default calls MPI_Abort). Tests pass one that records the message.
  using AbortFn = std::function<void(const std::string& message)>;

  Watchdog(int world_rank, double timeout_s, AbortFn abort = {});
  ~Watchdog();  // stops and joins the thread
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Hot path (the rank's main thread). `collective` and `group` must outlive the call (string
  // literals and the communicator's name).
  void set_step(int64_t step) { step_.store(step, std::memory_order_relaxed); }
  void enter(const char* collective, const char* group);
  void leave() { entered_ns_.store(0, std::memory_order_release); }

  bool fired() const { return fired_.load(); }
  double timeout_s() const { return timeout_s_; }

 private:
  void run();

  const int rank_;
  const double timeout_s_;
  AbortFn abort_;
  std::atomic<int64_t> entered_ns_{0};  // steady_clock ns when the current collective began; 0: none
  std::atomic<const char*> collective_{nullptr};
  std::atomic<const char*> group_{nullptr};
  std::atomic<int64_t> step_{0};
  std::atomic<bool> fired_{false};
  std::mutex mutex_;  // only for the stop handshake with the thread, never on the hot path
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;
};

// A Communicator that reports every call to a Watchdog and forwards it to the wrapped one.
// Byte counters are moved from the wrapped communicator into this one after each call, so
// counters() and counters().reset() behave as on the original.
class WatchedCommunicator final : public Communicator {
 public:
  WatchedCommunicator(std::unique_ptr<Communicator> inner, Watchdog& watchdog);

  CommBackend backend() const override { return inner_->backend(); }
  void all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) override;
  void all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs, void* recv,
                   const size_t* recv_counts, const size_t* recv_displs, DType t) override;
  void all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType t, ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType t) override;
  void broadcast(void* buf, size_t count, DType t, int root) override;
  void barrier() override;
  void synchronize() override;
  void set_stream(void* cuda_stream) override { inner_->set_stream(cuda_stream); }

  Communicator& inner() { return *inner_; }

 private:
  template <typename Fn>
  void watched(const char* collective, Fn&& fn);

  std::unique_ptr<Communicator> inner_;
  Watchdog& watchdog_;
};

// Replaces the world, sequence and data communicators of `groups` by watched ones.
void watch_process_groups(ProcessGroups& groups, Watchdog& watchdog);

}  // namespace ulysses
