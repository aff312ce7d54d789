// The Communicator: the collectives the trainer needs over one process group, on buffers and
// counts; it knows nothing of the model. Backends: MPI over host memory (comm/mpi_communicator)
// and NCCL over device memory (comm/nccl_communicator, built with ULYSSES_CUDA).
// Every failure throws a CommError naming the collective, the group and the rank.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "core/base/tensor.h"

namespace ulysses {

enum class ReduceOp : uint8_t { sum, avg, max };
enum class CommBackend : uint8_t { mpi, nccl };
const char* comm_backend_name(CommBackend b);

struct CommError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Bytes this rank sent per collective kind since the last reset; "sent" counts only what leaves
// the rank (an all-to-all's own block stays local and is not counted).
enum class Collective : uint8_t { all_to_all, all_reduce, reduce_scatter, all_gather, broadcast, count };
const char* collective_name(Collective c);
struct CommCounters {
  std::array<uint64_t, size_t(Collective::count)> bytes_sent{};
  std::array<uint64_t, size_t(Collective::count)> calls{};
  uint64_t total_bytes_sent() const;
  void reset() { *this = CommCounters{}; }
  // adds `other`'s counts to these and resets `other` (a wrapping communicator takes the wrapped
  // one's counts after each call: comm/staged_communicator, comm/watchdog)
  void take(CommCounters& other);
};

// A nonblocking all_to_allv in flight (start_all_to_allv .. wait). Made once by make_request()
// and reused: one request holds one collective at a time; the buffers and counts it was started
// with must stay untouched until wait() returns. Backends subclass it to keep their handle (and
// MPI its int count arrays, sized at creation, so starting one allocates nothing).
struct CommRequest {
  virtual ~CommRequest() = default;
  bool in_flight = false;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual CommBackend backend() const = 0;
  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }  // "world", "sequence[0]", "data[1]", ...

  // Equal blocks: send holds size() blocks of `count_per_peer` elements, block j goes to rank j;
  // recv receives block i from rank i. send and recv must not overlap.
  virtual void all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) = 0;
  // Per-peer counts and displacements, in elements.
  virtual void all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs,
                           void* recv, const size_t* recv_counts, const size_t* recv_displs,
                           DType t) = 0;
  // Nonblocking all_to_allv: start it into `request` (not in flight), complete it with wait().
  // Requests started on one communicator must be started in the same order on every rank (they
  // match by order, like every collective); any number may be in flight at once. The default is
  // the blocking call, so the request is already complete when start returns (NCCL, staged MPI
  // and the emulated communicator: their all_to_allv is enqueued on the stream or blocking
  // anyway; comm/ulysses.h overlaps them with a CUDA stream instead). MpiCommunicator overrides
  // them with MPI_Ialltoallv / MPI_Wait.
  virtual std::unique_ptr<CommRequest> make_request() { return std::make_unique<CommRequest>(); }
  virtual void start_all_to_allv(CommRequest& request, const void* send, const size_t* send_counts,
                                 const size_t* send_displs, void* recv, const size_t* recv_counts,
                                 const size_t* recv_displs, DType t) {
    all_to_allv(send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
    request.in_flight = true;
  }
  virtual void wait(CommRequest& request) { request.in_flight = false; }

  // In place when send == recv. avg divides by size().
  virtual void all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) = 0;
  // send: size() * recv_count elements; rank i receives the reduced block i.
  virtual void reduce_scatter(const void* send, void* recv, size_t recv_count, DType t,
                              ReduceOp op) = 0;
  // recv: size() * send_count elements, block i from rank i.
  virtual void all_gather(const void* send, void* recv, size_t send_count, DType t) = 0;
  virtual void broadcast(void* buf, size_t count, DType t, int root) = 0;
  virtual void barrier() = 0;
  // Blocks until this communicator's queued work is done (no-op on MPI; stream sync on NCCL).
  virtual void synchronize() {}

  // NCCL: the CUDA stream collectives are enqueued on (a cudaStream_t). MPI ignores it.
  virtual void set_stream(void* /*cuda_stream*/) {}

  // The collectives called between group_begin() and group_end() may be fused into one launch
  // (NCCL: ncclGroupStart / ncclGroupEnd, one kernel for many small all-reduces); the others run
  // each one as it is called. Results are valid only after group_end() (on the stream, for NCCL).
  virtual void group_begin() {}
  virtual void group_end() {}

  CommCounters& counters() { return counters_; }
  const CommCounters& counters() const { return counters_; }

 protected:
  Communicator(std::string name, int rank, int size)
      : name_(std::move(name)), rank_(rank), size_(size) {}
  void count(Collective c, uint64_t bytes) {
    counters_.bytes_sent[size_t(c)] += bytes;
    counters_.calls[size_t(c)] += 1;
  }
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  CommCounters counters_;
};

}  // namespace ulysses
