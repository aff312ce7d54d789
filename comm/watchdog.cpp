// Hang detection (see comm/watchdog.h).
#include "comm/watchdog.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

namespace ulysses {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The default abort: end the whole job. MPI_Abort from this (non-main) thread is what Open MPI
// and MPICH do in practice even at MPI_THREAD_FUNNELED; if it ever returned, exit anyway.
void abort_job(const std::string& /*message*/) {
  MPI_Abort(MPI_COMM_WORLD, kExitCommTimeout);
  std::_Exit(kExitCommTimeout);
}

}  // namespace

Watchdog::Watchdog(int world_rank, double timeout_s, AbortFn abort)
    : rank_(world_rank), timeout_s_(timeout_s), abort_(abort ? std::move(abort) : AbortFn(abort_job)) {
  thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Watchdog::Slot::enter(const char* w, const char* g) {
  what.store(w, std::memory_order_relaxed);
  group.store(g, std::memory_order_relaxed);
  entered_ns.store(now_ns(), std::memory_order_release);  // publishes the two stores above
}

bool Watchdog::check(Slot& slot, int64_t timeout_ns, std::unique_lock<std::mutex>& lock) {
  const int64_t entered = slot.entered_ns.load(std::memory_order_acquire);
  if (entered == 0) return false;
  const int64_t waited = now_ns() - entered;
  if (waited < timeout_ns) return false;
  const char* what = slot.what.load(std::memory_order_relaxed);
  const char* group = slot.group.load(std::memory_order_relaxed);
  const int64_t step = step_.load(std::memory_order_relaxed);
  // The main thread may have left (and entered another one) meanwhile: look again.
  if (slot.entered_ns.load(std::memory_order_acquire) != entered) return false;
  fired_ = true;
  const std::string message = fmt::format(
      "watchdog: rank {}: {} on group '{}' at step {} has not finished after {:.1f} s (runtime.comm_timeout = "
      "{} s): a peer rank has died, hung or taken another code path; aborting the job (exit code {})",
      rank_, what, group, step, double(waited) / 1e9, timeout_s_, kExitCommTimeout);
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::fflush(stderr);
  lock.unlock();
  abort_(message);
  lock.lock();
  return true;
}

void Watchdog::run() {
  const auto poll = std::chrono::duration<double>(std::min(1.0, timeout_s_ / 10));
  const int64_t timeout_ns = int64_t(timeout_s_ * 1e9);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    wake_.wait_for(lock, poll, [this] { return stop_; });
    if (stop_ || fired_) break;
    // the collective first: when both are late it names the more precise culprit
    if (!check(collective_, timeout_ns, lock)) check(region_, timeout_ns, lock);
  }
}

// --- WatchedCommunicator ------------------------------------------------------------------------

WatchedCommunicator::WatchedCommunicator(std::unique_ptr<Communicator> inner, Watchdog& watchdog)
    : Communicator(inner->name(), inner->rank(), inner->size()), inner_(std::move(inner)), watchdog_(watchdog) {
  counters_.take(inner_->counters());
}

template <typename Fn>
void WatchedCommunicator::watched(const char* collective, Fn&& fn) {
  // Left on every exit path, also when the collective throws a CommError.
  struct Leave {
    Watchdog& w;
    ~Leave() { w.leave(); }
  } leave{watchdog_};
  watchdog_.enter(collective, name_.c_str());
  fn();
  counters_.take(inner_->counters());  // the wrapped communicator's byte counts, here (a few adds)
}

void WatchedCommunicator::all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) {
  watched("all_to_all", [&] { inner_->all_to_all(send, recv, count_per_peer, t); });
}
void WatchedCommunicator::all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs,
                                      void* recv, const size_t* recv_counts, const size_t* recv_displs, DType t) {
  watched("all_to_allv",
          [&] { inner_->all_to_allv(send, send_counts, send_displs, recv, recv_counts, recv_displs, t); });
}
void WatchedCommunicator::start_all_to_allv(CommRequest& request, const void* send, const size_t* send_counts,
                                            const size_t* send_displs, void* recv, const size_t* recv_counts,
                                            const size_t* recv_displs, DType t) {
  watched("start_all_to_allv", [&] {
    inner_->start_all_to_allv(request, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
  });
}
void WatchedCommunicator::wait(CommRequest& request) {
  watched("wait (all_to_allv)", [&] { inner_->wait(request); });
}
void WatchedCommunicator::group_end() {
  watched("group_end", [&] { inner_->group_end(); });
}
void WatchedCommunicator::all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) {
  watched("all_reduce", [&] { inner_->all_reduce(send, recv, count, t, op); });
}
void WatchedCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType t, ReduceOp op) {
  watched("reduce_scatter", [&] { inner_->reduce_scatter(send, recv, recv_count, t, op); });
}
void WatchedCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType t) {
  watched("all_gather", [&] { inner_->all_gather(send, recv, send_count, t); });
}
void WatchedCommunicator::broadcast(void* buf, size_t count, DType t, int root) {
  watched("broadcast", [&] { inner_->broadcast(buf, count, t, root); });
}
void WatchedCommunicator::barrier() {
  watched("barrier", [&] { inner_->barrier(); });
}
void WatchedCommunicator::synchronize() {
  watched("synchronize", [&] { inner_->synchronize(); });
}

void watch_process_groups(ProcessGroups& groups, Watchdog& watchdog) {
  for (std::unique_ptr<Communicator>* c : {&groups.world, &groups.sequence, &groups.data, &groups.host})
    if (*c) *c = std::make_unique<WatchedCommunicator>(std::move(*c), watchdog);
}

}  // namespace ulysses
