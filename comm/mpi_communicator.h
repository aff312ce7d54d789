// The MPI backend of Communicator: collectives over host memory on a private duplicate of an
// MPI communicator (MPI_ERRORS_RETURN, so every failure becomes a CommError that names the
// collective, the group and the rank instead of aborting the job).
//
// MPI counts and displacements are ints. Element counts above max_int_count() are handled
// without overflow: all_to_all(v) switches to MPI_Alltoallw with one derived datatype per peer
// (offsets as MPI_Aint), all_reduce and broadcast run in chunks, reduce_scatter and all_gather
// fall back to one chunked MPI_Reduce / MPI_Bcast per block.
//
// Nonblocking all_to_allv (start_all_to_allv / wait): MPI_Ialltoallv on int count arrays that
// the request owns (sized at make_request, so a start allocates nothing; MPI reads them until
// the wait). Counts beyond max_int_count() take the blocking MPI_Alltoallw path instead, and
// the request is complete when start returns. Progress: Open MPI moves a nonblocking collective
// on only inside MPI calls (no progress thread), so on the CPU the overlap is small.
#pragma once
#include <climits>
#include <string>

#include <mpi.h>

#include "comm/communicator.h"

namespace ulysses {

class MpiCommunicator final : public Communicator {
 public:
  // Works on a duplicate of `comm`; the caller keeps (and frees) its own handle.
  MpiCommunicator(MPI_Comm comm, std::string name);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  CommBackend backend() const override { return CommBackend::mpi; }
  void all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) override;
  void all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs,
                   void* recv, const size_t* recv_counts, const size_t* recv_displs,
                   DType t) override;
  void all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType t,
                      ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType t) override;
  void broadcast(void* buf, size_t count, DType t, int root) override;
  void barrier() override;
  std::unique_ptr<CommRequest> make_request() override;
  void start_all_to_allv(CommRequest& request, const void* send, const size_t* send_counts,
                         const size_t* send_displs, void* recv, const size_t* recv_counts,
                         const size_t* recv_displs, DType t) override;
  void wait(CommRequest& request) override;

  MPI_Comm mpi_comm() const { return comm_; }
  // Largest count or displacement handed to MPI as one int. INT_MAX normally; tests lower it
  // to run the large-count paths on small buffers. Must be >= 1.
  size_t max_int_count() const { return max_int_count_; }
  void set_max_int_count(size_t n);

 private:
  [[noreturn]] void fail(const char* collective, const std::string& what) const;
  void check(int rc, const char* collective) const;
  // Checks an all_to_allv's arguments; returns the largest count or displacement of any rank of
  // the group (collective: an all-reduce) and the bytes that leave this rank.
  struct VCheck {
    size_t largest = 0;
    uint64_t bytes_out = 0;
  };
  VCheck check_v(const char* what, const void* send, const size_t* send_counts, const size_t* send_displs,
                 const void* recv, const size_t* recv_counts, const size_t* recv_displs, DType t) const;
  void all_to_all_w(const char* collective, const void* send, const size_t* send_counts,
                    const size_t* send_displs, void* recv, const size_t* recv_counts,
                    const size_t* recv_displs, DType t);

  MPI_Comm comm_ = MPI_COMM_NULL;
  size_t max_int_count_ = size_t(INT_MAX);
};

}  // namespace ulysses
