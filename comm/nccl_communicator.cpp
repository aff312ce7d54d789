// The NCCL backend (comm/nccl_communicator.h): device-memory collectives on one CUDA stream.
// all_to_all(v) are grouped ncclSend/ncclRecv pairs; avg is ncclAvg; movement-only collectives
// (all_to_all, all_gather, broadcast) move raw bytes so every dtype works; reductions take
// f32, f64, i32 and bf16 (ncclBfloat16). Byte counters follow comm/comm_util.h, as on MPI.
#include "comm/nccl_communicator.h"

#include <exception>
#include <thread>

#include "comm/comm_util.h"
#include "comm/groups.h"

namespace ulysses {

namespace {

bool reduction_type(DType t, ncclDataType_t* out) {
  switch (t) {
    case DType::f32: *out = ncclFloat32; return true;
    case DType::f64: *out = ncclFloat64; return true;
    case DType::i32: *out = ncclInt32; return true;
    case DType::bf16: *out = ncclBfloat16; return true;
    case DType::u16: return false;
  }
  return false;
}

bool floating(DType t) { return t == DType::f32 || t == DType::f64 || t == DType::bf16; }

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::max: return ncclMax;
  }
  return ncclSum;
}

}  // namespace

using comm_detail::at;

NcclCommunicator::NcclCommunicator(MPI_Comm comm, std::string name)
    : Communicator(std::move(name), 0, 1) {
  ULYSSES_MPI_CHECK(MPI_Comm_rank(comm, &rank_));
  ULYSSES_MPI_CHECK(MPI_Comm_size(comm, &size_));
  ULYSSES_COMM_CUDA_CHECK(cudaGetDevice(&device_));
  // Rank 0 of the group makes the id; everybody else learns it over MPI. A failing
  // ncclGetUniqueId is reported to the other ranks through the broadcast status word, so that
  // nobody waits in ncclCommInitRank for a rank that has already thrown.
  ncclUniqueId id{};
  int status = ncclSuccess;
  if (rank_ == 0) status = int(ncclGetUniqueId(&id));
  ULYSSES_MPI_CHECK(MPI_Bcast(&status, 1, MPI_INT, 0, comm));
  if (status != ncclSuccess)
    fail("init", fmt::format("ncclGetUniqueId on the group's rank 0: {}",
                             ncclGetErrorString(ncclResult_t(status))));
  ULYSSES_MPI_CHECK(MPI_Bcast(&id, int(sizeof(id)), MPI_BYTE, 0, comm));
  check(ncclCommInitRank(&comm_, size_, id, rank_), "init");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&barrier_word_), sizeof(int)), "init");
}

NcclCommunicator::~NcclCommunicator() {
  // A destructor cannot throw: errors here are ignored (the job is ending or already failed).
  // ncclCommFinalize waits until the group is globally quiescent: right on a normal end, where
  // every rank destroys its groups in the same order, but a hang while an exception unwinds this
  // rank alone (its peers may wait in a collective it will never join). Abort then, which also
  // ends this rank's NCCL kernels. The communicator goes first: cudaFree waits for the device.
  if (comm_) {
    if (std::uncaught_exceptions() == 0 && ncclCommFinalize(comm_) == ncclSuccess)
      (void)ncclCommDestroy(comm_);
    else
      (void)ncclCommAbort(comm_);
  }
  if (barrier_word_) (void)cudaFree(barrier_word_);
}

void NcclCommunicator::fail(const char* collective, const std::string& what) const {
  throw CommError(fmt::format("nccl {} on group '{}' rank {}/{}: {}", collective, name_, rank_,
                              size_, what));
}

void NcclCommunicator::check(ncclResult_t rc, const char* collective) const {
  if (rc == ncclSuccess) return;
  const char* last = comm_ ? ncclGetLastError(comm_) : ncclGetLastError(nullptr);
  fail(collective, fmt::format("{}{}{}", ncclGetErrorString(rc), last && *last ? ": " : "",
                               last ? last : ""));
}

void NcclCommunicator::check_cuda(cudaError_t rc, const char* collective) const {
  if (rc != cudaSuccess)
    fail(collective, fmt::format("CUDA {}: {}", cudaGetErrorName(rc), cudaGetErrorString(rc)));
}

void NcclCommunicator::all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) {
  const char* what = "all_to_all";
  const size_t bytes = count_per_peer * dtype_size(t);
  if (bytes > 0 && (!send || !recv)) fail(what, "null buffer");
  if (send == recv && bytes > 0) fail(what, "send and recv must not overlap");
  if (bytes == 0) {
    count(Collective::all_to_all, 0);
    return;
  }
  check(ncclGroupStart(), what);
  for (int j = 0; j < size_; j++) {
    check(ncclSend(at(send, size_t(j), bytes), bytes, ncclUint8, j, comm_, stream_), what);
    check(ncclRecv(at(recv, size_t(j), bytes), bytes, ncclUint8, j, comm_, stream_), what);
  }
  check(ncclGroupEnd(), what);
  count(Collective::all_to_all, comm_detail::all_to_all_bytes(size_, count_per_peer, dtype_size(t)));
}

void NcclCommunicator::all_to_allv(const void* send, const size_t* send_counts,
                                   const size_t* send_displs, void* recv,
                                   const size_t* recv_counts, const size_t* recv_displs, DType t) {
  const char* what = "all_to_allv";
  if (!send_counts || !send_displs || !recv_counts || !recv_displs)
    fail(what, "null count or displacement array");
  const size_t elem = dtype_size(t);
  uint64_t bytes_out = 0;
  check(ncclGroupStart(), what);
  for (int j = 0; j < size_; j++) {
    // Zero-byte sends are skipped on both sides, so the pairs still match.
    if (send_counts[j] > 0)
      check(ncclSend(at(send, send_displs[j], elem), send_counts[j] * elem, ncclUint8, j, comm_,
                     stream_),
            what);
    if (recv_counts[j] > 0)
      check(ncclRecv(at(recv, recv_displs[j], elem), recv_counts[j] * elem, ncclUint8, j, comm_,
                     stream_),
            what);
    if (j != rank_) bytes_out += uint64_t(send_counts[j]) * elem;
  }
  check(ncclGroupEnd(), what);
  count(Collective::all_to_all, bytes_out);
}

void NcclCommunicator::all_reduce(const void* send, void* recv, size_t count_, DType t,
                                  ReduceOp op) {
  const char* what = "all_reduce";
  ncclDataType_t type;
  if (!reduction_type(t, &type))
    fail(what, fmt::format("unsupported dtype {} for a reduction", dtype_name(t)));
  if (op == ReduceOp::avg && !floating(t))
    fail(what, fmt::format("avg needs a floating-point dtype, got {}", dtype_name(t)));
  check(ncclAllReduce(send, recv, count_, type, nccl_op(op), comm_, stream_), what);
  count(Collective::all_reduce, comm_detail::all_reduce_bytes(size_, count_, dtype_size(t)));
}

void NcclCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType t,
                                      ReduceOp op) {
  const char* what = "reduce_scatter";
  ncclDataType_t type;
  if (!reduction_type(t, &type))
    fail(what, fmt::format("unsupported dtype {} for a reduction", dtype_name(t)));
  if (op == ReduceOp::avg && !floating(t))
    fail(what, fmt::format("avg needs a floating-point dtype, got {}", dtype_name(t)));
  // NCCL's in-place form is recv == send + rank * recv_count; ours (as on MPI) is send == recv
  // with the result in the first block, so that case reduces into the rank's own block and
  // moves it to the front afterwards.
  const size_t elem = dtype_size(t);
  if (send == recv && rank_ > 0) {
    void* own = at(recv, size_t(rank_) * recv_count, elem);
    check(ncclReduceScatter(send, own, recv_count, type, nccl_op(op), comm_, stream_), what);
    check_cuda(cudaMemcpyAsync(recv, own, recv_count * elem, cudaMemcpyDeviceToDevice, stream_),
               what);
  } else {
    check(ncclReduceScatter(send, recv, recv_count, type, nccl_op(op), comm_, stream_), what);
  }
  count(Collective::reduce_scatter, comm_detail::reduce_scatter_bytes(size_, recv_count, elem));
}

void NcclCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType t) {
  const char* what = "all_gather";
  const size_t bytes = send_count * dtype_size(t);
  check(ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream_), what);
  count(Collective::all_gather, comm_detail::all_gather_bytes(size_, send_count, dtype_size(t)));
}

void NcclCommunicator::broadcast(void* buf, size_t count_, DType t, int root) {
  const char* what = "broadcast";
  if (root < 0 || root >= size_) fail(what, fmt::format("root {} is not a rank of the group", root));
  check(ncclBroadcast(buf, buf, count_ * dtype_size(t), ncclUint8, root, comm_, stream_), what);
  count(Collective::broadcast,
        comm_detail::broadcast_bytes(size_, rank_, root, count_, dtype_size(t)));
}

void NcclCommunicator::barrier() {
  check(ncclAllReduce(barrier_word_, barrier_word_, 1, ncclInt32, ncclSum, comm_, stream_),
        "barrier");
  synchronize();
}

void NcclCommunicator::group_begin() { check(ncclGroupStart(), "group_begin"); }
void NcclCommunicator::group_end() { check(ncclGroupEnd(), "group_end"); }

// Polls rather than blocking in cudaStreamSynchronize, so that an asynchronous NCCL error (a
// peer died, a network failure) becomes a CommError instead of a hang.
void NcclCommunicator::synchronize() {
  for (;;) {
    cudaError_t rc = cudaStreamQuery(stream_);
    if (rc == cudaSuccess) return;
    if (rc != cudaErrorNotReady) check_cuda(rc, "synchronize");
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &async), "synchronize");
    if (async != ncclSuccess && async != ncclInProgress) {
      (void)ncclCommAbort(comm_);  // the communicator is unusable from here on
      comm_ = nullptr;
      fail("synchronize", fmt::format("asynchronous error: {} (communicator aborted)",
                                      ncclGetErrorString(async)));
    }
    std::this_thread::yield();
  }
}

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, std::string name) {
  return std::make_unique<NcclCommunicator>(comm, std::move(name));
}

}  // namespace ulysses
