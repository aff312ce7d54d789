// The MPI backend on device memory (comm/staged_communicator.h): device -> pinned host -> the
// wrapped MPI collective -> device, on the stream given by set_stream.
#include "comm/staged_communicator.h"

#include <algorithm>

#include <fmt/format.h>

#include "comm/comm_util.h"
#include "comm/groups.h"

namespace ulysses {

using comm_detail::at;

StagedCommunicator::StagedCommunicator(std::unique_ptr<Communicator> host_comm)
    : Communicator(host_comm->name(), host_comm->rank(), host_comm->size()), inner_(std::move(host_comm)) {
  counters_.take(inner_->counters());
}

StagedCommunicator::~StagedCommunicator() {
  // Not checked (a destructor must not throw); cudaFreeHost waits for copies still reading.
  if (input_.data) (void)cudaFreeHost(input_.data);
  if (result_.data) (void)cudaFreeHost(result_.data);
}

void StagedCommunicator::fail(const char* collective, const std::string& what) const {
  throw CommError(fmt::format("staged mpi {} on group '{}' rank {}/{}: {}", collective, name_, rank_, size_, what));
}

void StagedCommunicator::check(cudaError_t rc, const char* collective, const char* call) const {
  if (rc != cudaSuccess)
    fail(collective, fmt::format("{} failed: {} ({})", call, cudaGetErrorString(rc), cudaGetErrorName(rc)));
}

char* StagedCommunicator::room(Pinned& buffer, size_t bytes, const char* collective) {
  if (bytes <= buffer.bytes) return static_cast<char*>(buffer.data);
  wait(collective);  // the previous call's result copy may still read the old buffer
  // a regrowth at least doubles: the chunked all-to-alls (runtime.all_to_all_chunks) ask for a
  // longer span with each chunk of their first step, and each regrowth costs a device-wide sync
  const size_t grown = buffer.bytes > 0 ? std::max(bytes, 2 * buffer.bytes) : bytes;
  if (buffer.data) check(cudaFreeHost(buffer.data), collective, "cudaFreeHost");
  buffer = Pinned{};
  check(cudaHostAlloc(&buffer.data, grown, cudaHostAllocDefault), collective,
        fmt::format("cudaHostAlloc({} bytes)", grown).c_str());
  buffer.bytes = grown;
  return static_cast<char*>(buffer.data);
}

void StagedCommunicator::to_host(void* host, const void* device, size_t bytes, const char* collective) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDefault, stream_), collective, "cudaMemcpyAsync (to host)");
}

void StagedCommunicator::to_device(void* device, const void* host, size_t bytes, const char* collective) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(device, host, bytes, cudaMemcpyDefault, stream_), collective,
        "cudaMemcpyAsync (to device)");
}

void StagedCommunicator::wait(const char* collective) {
  check(cudaStreamSynchronize(stream_), collective, "cudaStreamSynchronize");
}

void StagedCommunicator::take_counts() { counters_.take(inner_->counters()); }

void StagedCommunicator::all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) {
  const char* what = "all_to_all";
  const size_t bytes = size_t(size_) * count_per_peer * dtype_size(t);
  char* in = room(input_, bytes, what);
  char* out = room(result_, bytes, what);
  to_host(in, send, bytes, what);
  wait(what);
  inner_->all_to_all(in, out, count_per_peer, t);
  take_counts();
  to_device(recv, out, bytes, what);
}

void StagedCommunicator::all_to_allv(const void* send, const size_t* send_counts, const size_t* send_displs,
                                     void* recv, const size_t* recv_counts, const size_t* recv_displs, DType t) {
  const char* what = "all_to_allv";
  if (!send_counts || !send_displs || !recv_counts || !recv_displs) fail(what, "null count or displacement array");
  const size_t elem = dtype_size(t);
  size_t send_end = 0, recv_end = 0;  // elements spanned by the blocks
  for (int j = 0; j < size_; j++) {
    if (send_counts[j]) send_end = std::max(send_end, send_displs[j] + send_counts[j]);
    if (recv_counts[j]) recv_end = std::max(recv_end, recv_displs[j] + recv_counts[j]);
  }
  char* in = room(input_, send_end * elem, what);
  char* out = room(result_, recv_end * elem, what);
  // block by block too: a chunked all-to-all (runtime.all_to_all_chunks) sends small blocks
  // spread over a large buffer, and only they are read
  for (int j = 0; j < size_; j++)
    if (send_counts[j])
      to_host(at(in, send_displs[j], elem), at(send, send_displs[j], elem), send_counts[j] * elem, what);
  wait(what);
  inner_->all_to_allv(in, send_counts, send_displs, out, recv_counts, recv_displs, t);
  take_counts();
  // block by block: what lies between the received blocks in `recv` stays untouched
  for (int j = 0; j < size_; j++)
    to_device(at(recv, recv_displs[j], elem), at(out, recv_displs[j], elem), recv_counts[j] * elem, what);
}

void StagedCommunicator::all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op) {
  const char* what = "all_reduce";
  const size_t bytes = count * dtype_size(t);
  if (send == recv) {
    char* buf = room(result_, bytes, what);
    to_host(buf, send, bytes, what);
    wait(what);
    inner_->all_reduce(buf, buf, count, t, op);
  } else {
    char* in = room(input_, bytes, what);
    char* out = room(result_, bytes, what);
    to_host(in, send, bytes, what);
    wait(what);
    inner_->all_reduce(in, out, count, t, op);
  }
  take_counts();
  to_device(recv, result_.data, bytes, what);
}

void StagedCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType t, ReduceOp op) {
  const char* what = "reduce_scatter";
  const size_t out_bytes = recv_count * dtype_size(t), in_bytes = size_t(size_) * out_bytes;
  if (send == recv) {  // in place: every block in, this rank's reduced block at the front out
    char* buf = room(result_, in_bytes, what);
    to_host(buf, send, in_bytes, what);
    wait(what);
    inner_->reduce_scatter(buf, buf, recv_count, t, op);
  } else {
    char* in = room(input_, in_bytes, what);
    char* out = room(result_, out_bytes, what);
    to_host(in, send, in_bytes, what);
    wait(what);
    inner_->reduce_scatter(in, out, recv_count, t, op);
  }
  take_counts();
  to_device(recv, result_.data, out_bytes, what);
}

void StagedCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType t) {
  const char* what = "all_gather";
  const size_t elem = dtype_size(t), in_bytes = send_count * elem, out_bytes = size_t(size_) * in_bytes;
  if (send == at(recv, size_t(rank_) * send_count, elem)) {  // in place: send is this rank's slot
    char* buf = room(result_, out_bytes, what);
    char* own = buf + size_t(rank_) * in_bytes;
    to_host(own, send, in_bytes, what);
    wait(what);
    inner_->all_gather(own, buf, send_count, t);
  } else {
    char* in = room(input_, in_bytes, what);
    char* out = room(result_, out_bytes, what);
    to_host(in, send, in_bytes, what);
    wait(what);
    inner_->all_gather(in, out, send_count, t);
  }
  take_counts();
  to_device(recv, result_.data, out_bytes, what);
}

void StagedCommunicator::broadcast(void* buf, size_t count, DType t, int root) {
  const char* what = "broadcast";
  const size_t bytes = count * dtype_size(t);
  char* host = room(result_, bytes, what);
  if (rank_ == root) to_host(host, buf, bytes, what);
  wait(what);  // also on the other ranks: the previous result copy may still read `host`
  inner_->broadcast(host, count, t, root);
  take_counts();
  if (rank_ != root) to_device(buf, host, bytes, what);
}

void StagedCommunicator::barrier() { inner_->barrier(); }

void StagedCommunicator::synchronize() { wait("synchronize"); }

std::unique_ptr<Communicator> make_staged_communicator(std::unique_ptr<Communicator> host_comm) {
  return std::make_unique<StagedCommunicator>(std::move(host_comm));
}

}  // namespace ulysses
