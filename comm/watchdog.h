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
//
// Regions: NCCL enqueues a collective and returns at once, so a dead peer shows up later, as a
// host wait on the device (the loss read, the gradient norm, the step's synchronize) that never
// ends. The trainer marks such spans of device work as regions (enter_region / leave_region, or
// WatchedRegion); a region is timed like a collective, independently of the collectives called
// inside it, and the message names it.
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
  void enter(const char* collective, const char* group) { collective_.enter(collective, group); }
  void leave() { collective_.leave(); }
  // A span of device work that waits on collectives (see above); not nested.
  void enter_region(const char* what, const char* group) { region_.enter(what, group); }
  void leave_region() { region_.leave(); }

  bool fired() const { return fired_.load(); }
  double timeout_s() const { return timeout_s_; }

 private:
  void run();

  // What the main thread is in: written by it, read by the watchdog thread.
  struct Slot {
    std::atomic<int64_t> entered_ns{0};  // steady_clock ns when it began; 0: none
    std::atomic<const char*> what{nullptr};
    std::atomic<const char*> group{nullptr};
    void enter(const char* w, const char* g);
    void leave() { entered_ns.store(0, std::memory_order_release); }
  };
  // true when `slot` has been in progress for longer than the timeout (then fires)
  bool check(Slot& slot, int64_t timeout_ns, std::unique_lock<std::mutex>& lock);

  const int rank_;
  const double timeout_s_;
  AbortFn abort_;
  Slot collective_, region_;
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
  void group_begin() override { inner_->group_begin(); }
  void group_end() override;
  // the nonblocking all_to_allv of the wrapped communicator (the watchdog times start and wait)
  std::unique_ptr<CommRequest> make_request() override { return inner_->make_request(); }
  void start_all_to_allv(CommRequest& request, const void* send, const size_t* send_counts, const size_t* send_displs,
                         void* recv, const size_t* recv_counts, const size_t* recv_displs, DType t) override;
  void wait(CommRequest& request) override;

  Communicator& inner() { return *inner_; }

 private:
  template <typename Fn>
  void watched(const char* collective, Fn&& fn);

  std::unique_ptr<Communicator> inner_;
  Watchdog& watchdog_;
};

// Replaces the world, sequence, data (and host) communicators of `groups` by watched ones.
void watch_process_groups(ProcessGroups& groups, Watchdog& watchdog);

// enter_region on construction, leave_region on destruction (also when an exception leaves);
// does nothing when `enabled` is false (e.g. on MPI, whose collectives block and are watched).
class WatchedRegion {
 public:
  WatchedRegion(Watchdog& watchdog, bool enabled, const char* what, const char* group)
      : watchdog_(enabled ? &watchdog : nullptr) {
    if (watchdog_) watchdog_->enter_region(what, group);
  }
  ~WatchedRegion() {
    if (watchdog_) watchdog_->leave_region();
  }
  WatchedRegion(const WatchedRegion&) = delete;
  WatchedRegion& operator=(const WatchedRegion&) = delete;

 private:
  Watchdog* watchdog_;
};

}  // namespace ulysses
