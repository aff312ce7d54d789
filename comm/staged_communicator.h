// The MPI backend on device memory: a Communicator that takes CUDA device buffers and runs a
// wrapped host-memory communicator (MpiCommunicator) on pinned host copies of them. For ranks
// that share a GPU (NCCL refuses two ranks on one device) and for MPIs without CUDA support.
//
// Every collective:
//   1. enqueues the input's device-to-host copy on the stream (set_stream), after the kernels
//      that wrote it, and waits for the stream (cudaStreamSynchronize);
//   2. runs the wrapped collective on the pinned host buffers;
//   3. enqueues the result's host-to-device copy on the stream and returns without waiting:
//      later work on the stream sees the result, as with NCCL.
// The host buffers alias exactly as the caller's device buffers do (send == recv stays in place,
// an all_gather whose send is its own slot of recv stays so), so the wrapped communicator's
// in-place conventions apply unchanged. Pinned buffers (one for inputs, one for results) are
// allocated on first use and grown when a larger size comes (in the first training step), never
// shrunk. Step 1's wait also covers the previous call's step 3, so a pinned buffer is never
// overwritten while a copy still reads it.
// Counters are the wrapped communicator's: what MPI sent. Copies use cudaMemcpyDefault, so host
// pointers work too (they are copied like device ones). Built only with ULYSSES_CUDA.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include <cuda_runtime.h>

#include "comm/communicator.h"

namespace ulysses {

class StagedCommunicator final : public Communicator {
 public:
  explicit StagedCommunicator(std::unique_ptr<Communicator> host_comm);
  ~StagedCommunicator() override;
  StagedCommunicator(const StagedCommunicator&) = delete;
  StagedCommunicator& operator=(const StagedCommunicator&) = delete;

  CommBackend backend() const override { return inner_->backend(); }
  void all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) override;
  void all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs, void* recv,
                   const size_t* recv_counts, const size_t* recv_displs, DType t) override;
  void all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType t, ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType t) override;
  void broadcast(void* buf, size_t count, DType t, int root) override;
  void barrier() override;       // the wrapped barrier (host only)
  void synchronize() override;   // waits for the stream (the last result's copy)
  // The stream the next collectives run on. Each collective ends with its result's copy to the
  // device still queued on that stream, reading a pinned buffer the next collective refills
  // after waiting for its own stream only; so a user that moves the communicator between streams
  // (comm/comm_stream.h) must order the streams in between: CommStream::run with host_wait does,
  // and UlyssesAllToAll argues its order in comm/ulysses.h.
  void set_stream(void* cuda_stream) override { stream_ = static_cast<cudaStream_t>(cuda_stream); }

  size_t pinned_bytes() const { return input_.bytes + result_.bytes; }

 private:
  struct Pinned {
    void* data = nullptr;
    size_t bytes = 0;
  };
  // `buffer` with room for `bytes` (grown: waits for the stream, frees, allocates pinned memory)
  char* room(Pinned& buffer, size_t bytes, const char* collective);
  void to_host(void* host, const void* device, size_t bytes, const char* collective);
  void to_device(void* device, const void* host, size_t bytes, const char* collective);
  void wait(const char* collective);
  void take_counts();  // moves the wrapped communicator's counters into this one
  [[noreturn]] void fail(const char* collective, const std::string& what) const;
  void check(cudaError_t rc, const char* collective, const char* call) const;

  std::unique_ptr<Communicator> inner_;
  cudaStream_t stream_ = nullptr;
  Pinned input_, result_;
};

}  // namespace ulysses
