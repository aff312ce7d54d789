// The NCCL backend of Communicator: collectives over device memory, enqueued on one CUDA
// stream (set_stream; the legacy default stream until then). The NCCL communicator is built
// from an ncclUniqueId made on the group's rank 0 and broadcast over the group's MPI
// communicator, so the CUDA device must be selected (select_cuda_device) before construction.
// Calls return once the work is enqueued; synchronize() waits for it and surfaces NCCL's
// asynchronous errors. Every failure is a CommError naming collective, group, rank and the
// NCCL error text. Built only with ULYSSES_CUDA (files nccl_* are left out of CPU builds).
#pragma once
#include <string>

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include "comm/communicator.h"

namespace ulysses {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm`: every rank of it must construct its NcclCommunicator together.
  NcclCommunicator(MPI_Comm comm, std::string name);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  CommBackend backend() const override { return CommBackend::nccl; }
  void all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) override;
  void all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs,
                   void* recv, const size_t* recv_counts, const size_t* recv_displs,
                   DType t) override;
  void all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType t,
                      ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType t) override;
  void broadcast(void* buf, size_t count, DType t, int root) override;
  void barrier() override;  // a one-element all_reduce, then synchronize()
  void synchronize() override;
  void set_stream(void* cuda_stream) override { stream_ = static_cast<cudaStream_t>(cuda_stream); }
  void group_begin() override;
  void group_end() override;

  ncclComm_t nccl_comm() const { return comm_; }
  int device() const { return device_; }

 private:
  [[noreturn]] void fail(const char* collective, const std::string& what) const;
  void check(ncclResult_t rc, const char* collective) const;
  void check_cuda(cudaError_t rc, const char* collective) const;

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int device_ = -1;
  int* barrier_word_ = nullptr;  // one device int for barrier()
};

}  // namespace ulysses
