// One-rank emulation of a P-rank sequence-parallel run (parallel.emulate_sequence = P).
//
// The model is built as rank `rank` of a P-rank sequence group (N/P tokens outside attention,
// its H/P heads on all N tokens inside), but its sequence communicator is this class: every
// all-to-all is a local copy of the same size. Block j of the send buffer (what would go to peer
// j) lands where peer j's block would arrive, min(send, recv) elements of it, so the pack /
// unpack ops and the bytes moved through memory are those of a real rank; only the wire is
// missing. The counters count exactly what the MPI communicator would count (the blocks for the
// P - 1 peers), so the emulated rank reports the communication volume a real rank would send.
// The numbers it computes are not those of the real run (each rank sees its own data in place of
// its peers'): use it for timing and memory, not for losses.
// On cuda (device = cuda) the buffers are device memory and every copy is a cudaMemcpyAsync on
// the stream given by set_stream (the model's: GPT's constructor sets it), so the copies run in
// order with the model's kernels and nothing waits for the host. With runtime.all_to_all_chunks
// > 1, UlyssesAllToAll sets its communication stream around each chunk's all_to_allv (and the
// model's back after), so the chunks' copies run beside the GEMMs, as NCCL's transfers would.
#pragma once
#include "comm/communicator.h"

namespace ulysses {

class EmulatedSequenceCommunicator final : public Communicator {
 public:
  EmulatedSequenceCommunicator(int size, int rank = 0, Device device = Device::cpu);
  CommBackend backend() const override { return CommBackend::mpi; }
  void set_stream(void* cuda_stream) override { stream_ = cuda_stream; }

  void all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) override;
  void all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs, void* recv,
                   const size_t* recv_counts, const size_t* recv_displs, DType t) override;
  // The remaining collectives copy the local data as if every peer held the same (all_reduce:
  // sum of P equal copies is not formed; the buffer is left as it is) and count their volume.
  void all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType t, ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType t) override;
  void broadcast(void* buf, size_t count, DType t, int root) override;
  void barrier() override {}
  void synchronize() override;  // waits for the stream on cuda

 private:
  // dst = src, `bytes` bytes: memmove on cpu, cudaMemcpyAsync on the stream on cuda
  void move(void* dst, const void* src, size_t bytes);
  Device device_;
  void* stream_ = nullptr;  // cudaStream_t
};

}  // namespace ulysses
