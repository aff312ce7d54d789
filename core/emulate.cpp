// EmulatedSequenceCommunicator (see core/emulate.h): all-to-alls as local copies, counted like MPI.
#include "core/emulate.h"

#include <algorithm>
#include <cstring>

#include "comm/comm_util.h"
#include "core/base/error.h"
#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#endif

namespace ulysses {

EmulatedSequenceCommunicator::EmulatedSequenceCommunicator(int size, int rank, Device device)
    : Communicator(fmt::format("emulated-sequence[{} of {}]", rank, size), rank, size), device_(device) {
  ULYSSES_ASSERT(size >= 1 && rank >= 0 && rank < size, "emulated group: rank {} of {}", rank, size);
#ifndef ULYSSES_CUDA
  if (device == Device::cuda) throw_user_error("parallel.emulate_sequence on cuda needs a build with CUDA");
#endif
}

void EmulatedSequenceCommunicator::move(void* dst, const void* src, size_t bytes) {
  if (bytes == 0 || dst == src) return;
  if (device_ == Device::cpu) {
    std::memmove(dst, src, bytes);
    return;
  }
#ifdef ULYSSES_CUDA
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream_)));
#endif
}

void EmulatedSequenceCommunicator::synchronize() {
#ifdef ULYSSES_CUDA
  if (device_ == Device::cuda) CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
#endif
}

void EmulatedSequenceCommunicator::all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) {
  move(recv, send, size_t(size_) * count_per_peer * dtype_size(t));
  count(Collective::all_to_all, comm_detail::all_to_all_bytes(size_, count_per_peer, dtype_size(t)));
}

void EmulatedSequenceCommunicator::all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs,
                                               void* recv, const size_t* recv_counts, const size_t* recv_displs,
                                               DType t) {
  const size_t elem = dtype_size(t);
  uint64_t bytes_out = 0;
  for (int j = 0; j < size_; ++j) {
    // the own block is the real one; peer j's block is stood in for by what we send to peer j
    const size_t n = std::min(send_counts[j], recv_counts[j]);
    move(static_cast<char*>(recv) + recv_displs[j] * elem, static_cast<const char*>(send) + send_displs[j] * elem,
         n * elem);
    if (j != rank_) bytes_out += uint64_t(send_counts[j]) * elem;
  }
  count(Collective::all_to_all, bytes_out);
}

void EmulatedSequenceCommunicator::all_reduce(const void* send, void* recv, size_t n, DType t, ReduceOp) {
  move(recv, send, n * dtype_size(t));
  count(Collective::all_reduce, comm_detail::all_reduce_bytes(size_, n, dtype_size(t)));
}

void EmulatedSequenceCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType t,
                                                  ReduceOp) {
  move(recv, static_cast<const char*>(send) + size_t(rank_) * recv_count * dtype_size(t), recv_count * dtype_size(t));
  count(Collective::reduce_scatter, comm_detail::reduce_scatter_bytes(size_, recv_count, dtype_size(t)));
}

void EmulatedSequenceCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType t) {
  const size_t bytes = send_count * dtype_size(t);
  for (int j = 0; j < size_; ++j) move(static_cast<char*>(recv) + size_t(j) * bytes, send, bytes);
  count(Collective::all_gather, comm_detail::all_gather_bytes(size_, send_count, dtype_size(t)));
}

void EmulatedSequenceCommunicator::broadcast(void*, size_t n, DType t, int root) {
  count(Collective::broadcast, comm_detail::broadcast_bytes(size_, rank_, root, n, dtype_size(t)));
}

}  // namespace ulysses
