// The MPI backend (comm/mpi_communicator.h): host-memory collectives on a duplicated MPI
// communicator with MPI_ERRORS_RETURN. Byte counters follow comm/comm_util.h.
#include "comm/mpi_communicator.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "comm/comm_util.h"
#include "comm/groups.h"

namespace ulysses {

namespace {

// bf16 and u16 travel as raw 2-byte words: fine for moving data, meaningless for reducing it.
MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::bf16:
    case DType::u16: return MPI_UINT16_T;
  }
  return MPI_DATATYPE_NULL;
}

bool reducible(DType t) { return t == DType::f32 || t == DType::f64 || t == DType::i32; }
bool floating(DType t) { return t == DType::f32 || t == DType::f64; }

// avg is a sum followed by a division by the group size (below).
MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::max ? MPI_MAX : MPI_SUM; }

void divide_in_place(void* buf, size_t count, DType t, int divisor) {
  if (t == DType::f32) {
    float* x = static_cast<float*>(buf);
    const float d = float(divisor);
    for (size_t i = 0; i < count; i++) x[i] /= d;
  } else if (t == DType::f64) {
    double* x = static_cast<double*>(buf);
    const double d = double(divisor);
    for (size_t i = 0; i < count; i++) x[i] /= d;
  }
}

bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && pa < pb + b_bytes && pb < pa + a_bytes;
}

}  // namespace

using comm_detail::at;

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name)
    : Communicator(std::move(name), 0, 1) {
  ULYSSES_MPI_CHECK(MPI_Comm_dup(comm, &comm_));
  ULYSSES_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  ULYSSES_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  ULYSSES_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::set_max_int_count(size_t n) {
  if (n < 1 || n > size_t(INT_MAX)) fail("set_max_int_count", fmt::format("bad limit {}", n));
  max_int_count_ = n;
}

void MpiCommunicator::fail(const char* collective, const std::string& what) const {
  throw CommError(fmt::format("mpi {} on group '{}' rank {}/{}: {}", collective, name_, rank_,
                              size_, what));
}

void MpiCommunicator::check(int rc, const char* collective) const {
  if (rc != MPI_SUCCESS) fail(collective, comm_detail::mpi_error_text(rc));
}

void MpiCommunicator::all_to_all(const void* send, void* recv, size_t count_per_peer, DType t) {
  const char* what = "all_to_all";
  const size_t elem = dtype_size(t), bytes = size_t(size_) * count_per_peer * elem;
  if (bytes > 0 && (!send || !recv)) fail(what, "null buffer");
  if (overlap(send, bytes, recv, bytes)) fail(what, "send and recv buffers overlap");
  if (count_per_peer <= max_int_count_) {
    check(MPI_Alltoall(send, int(count_per_peer), mpi_type(t), recv, int(count_per_peer),
                       mpi_type(t), comm_),
          what);
  } else {
    const size_t p = static_cast<size_t>(size_);
    std::vector<size_t> counts(p, count_per_peer), displs(p);
    for (int j = 0; j < size_; j++) displs[size_t(j)] = size_t(j) * count_per_peer;
    all_to_all_w(what, send, counts.data(), displs.data(), recv, counts.data(), displs.data(), t);
  }
  count(Collective::all_to_all, comm_detail::all_to_all_bytes(size_, count_per_peer, elem));
}

MpiCommunicator::VCheck MpiCommunicator::check_v(const char* what, const void* send, const size_t* send_counts,
                                                 const size_t* send_displs, const void* recv,
                                                 const size_t* recv_counts, const size_t* recv_displs,
                                                 DType t) const {
  if (!send_counts || !send_displs || !recv_counts || !recv_displs)
    fail(what, "null count or displacement array");
  const size_t elem = dtype_size(t);
  size_t send_end = 0, recv_end = 0;
  VCheck v;
  for (int j = 0; j < size_; j++) {
    const size_t sc = send_counts[j], sd = send_displs[j], rc = recv_counts[j], rd = recv_displs[j];
    if (sc) send_end = std::max(send_end, sd + sc);
    if (rc) recv_end = std::max(recv_end, rd + rc);
    v.largest = std::max({v.largest, sc, sd, rc, rd});
    if (j != rank_) v.bytes_out += uint64_t(sc) * elem;
  }
  if ((send_end > 0 && !send) || (recv_end > 0 && !recv)) fail(what, "null buffer");
  if (overlap(send, send_end * elem, recv, recv_end * elem))
    fail(what, "send and recv buffers overlap");
  // the int or the Alltoallw path must be the same collective on every rank, and ranks' counts
  // differ (uneven heads, GQA): decide on the largest value over the group (one small
  // all-reduce, negligible beside the all-to-all)
  uint64_t largest = v.largest;
  check(MPI_Allreduce(MPI_IN_PLACE, &largest, 1, MPI_UINT64_T, MPI_MAX, comm_), what);
  v.largest = size_t(largest);
  return v;
}

void MpiCommunicator::all_to_allv(const void* send, const size_t* send_counts,
                                  const size_t* send_displs, void* recv,
                                  const size_t* recv_counts, const size_t* recv_displs, DType t) {
  const char* what = "all_to_allv";
  const VCheck v = check_v(what, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
  if (v.largest <= max_int_count_) {
    const size_t p = static_cast<size_t>(size_);
    std::vector<int> sc(p), sd(p), rc(p), rd(p);
    for (size_t j = 0; j < p; j++) {
      sc[j] = int(send_counts[j]);
      sd[j] = int(send_displs[j]);
      rc[j] = int(recv_counts[j]);
      rd[j] = int(recv_displs[j]);
    }
    check(MPI_Alltoallv(send, sc.data(), sd.data(), mpi_type(t), recv, rc.data(), rd.data(),
                        mpi_type(t), comm_),
          what);
  } else {
    all_to_all_w(what, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
  }
  count(Collective::all_to_all, v.bytes_out);
}

namespace {
// An MPI_Ialltoallv in flight and the int counts / displacements MPI reads until it completes.
struct MpiRequest final : CommRequest {
  const MpiCommunicator* owner = nullptr;
  MPI_Request handle = MPI_REQUEST_NULL;
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;  // [P] each
  // Not checked (a destructor must not throw). A request still in flight here means an error
  // unwound past its wait: complete it so MPI stops writing into buffers about to be freed.
  ~MpiRequest() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (in_flight && !finalized && handle != MPI_REQUEST_NULL) MPI_Wait(&handle, MPI_STATUS_IGNORE);
  }
};
}  // namespace

std::unique_ptr<CommRequest> MpiCommunicator::make_request() {
  auto r = std::make_unique<MpiRequest>();
  r->owner = this;
  const size_t p = size_t(size_);
  r->send_counts.resize(p), r->send_displs.resize(p), r->recv_counts.resize(p), r->recv_displs.resize(p);
  return r;
}

void MpiCommunicator::start_all_to_allv(CommRequest& request, const void* send, const size_t* send_counts,
                                        const size_t* send_displs, void* recv, const size_t* recv_counts,
                                        const size_t* recv_displs, DType t) {
  const char* what = "start_all_to_allv";
  auto* r = dynamic_cast<MpiRequest*>(&request);
  if (!r || r->owner != this) fail(what, "the request was not made by this communicator's make_request");
  if (r->in_flight) fail(what, "the request is still in flight (wait for it first)");
  const VCheck v = check_v(what, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
  if (v.largest <= max_int_count_) {
    for (size_t j = 0; j < size_t(size_); j++) {
      r->send_counts[j] = int(send_counts[j]);
      r->send_displs[j] = int(send_displs[j]);
      r->recv_counts[j] = int(recv_counts[j]);
      r->recv_displs[j] = int(recv_displs[j]);
    }
    check(MPI_Ialltoallv(send, r->send_counts.data(), r->send_displs.data(), mpi_type(t), recv,
                         r->recv_counts.data(), r->recv_displs.data(), mpi_type(t), comm_, &r->handle),
          what);
  } else {
    // beyond int counts: the blocking Alltoallw path; nothing left to wait for
    all_to_all_w(what, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
    r->handle = MPI_REQUEST_NULL;
  }
  r->in_flight = true;
  count(Collective::all_to_all, v.bytes_out);
}

void MpiCommunicator::wait(CommRequest& request) {
  auto* r = dynamic_cast<MpiRequest*>(&request);
  if (!r || r->owner != this) fail("wait", "the request was not made by this communicator's make_request");
  if (!r->in_flight) return;
  r->in_flight = false;  // MPI_Wait frees the handle, also when it reports an error
  check(MPI_Wait(&r->handle, MPI_STATUS_IGNORE), "wait (all_to_allv)");
}

// Large counts: one derived datatype per peer describing `count` elements at element offset
// `displ`, built as q blocks of a contiguous(max_int_count) type plus a remainder, with the
// offset carried as an MPI_Aint byte displacement. MPI_Alltoallw then moves one such datatype
// (or nothing) per peer, with every int displacement 0.
void MpiCommunicator::all_to_all_w(const char* collective, const void* send,
                                   const size_t* send_counts, const size_t* send_displs,
                                   void* recv, const size_t* recv_counts,
                                   const size_t* recv_displs, DType t) {
  const MPI_Datatype base = mpi_type(t);
  const size_t elem = dtype_size(t), chunk = max_int_count_;
  std::vector<MPI_Datatype> created;
  auto release = [&]() {
    for (MPI_Datatype& d : created) MPI_Type_free(&d);
    created.clear();
  };
  auto span_type = [&](size_t displ, size_t count) -> MPI_Datatype {
    if (count == 0) return MPI_BYTE;
    const size_t q = count / chunk, r = count % chunk;
    if (q > size_t(INT_MAX)) fail(collective, fmt::format("count {} too large", count));
    int blocklens[2];
    MPI_Aint offsets[2];
    MPI_Datatype types[2];
    int n = 0;
    if (q > 0) {
      MPI_Datatype block;
      check(MPI_Type_contiguous(int(chunk), base, &block), collective);
      created.push_back(block);
      blocklens[n] = int(q);
      offsets[n] = MPI_Aint(displ * elem);
      types[n++] = block;
    }
    if (r > 0) {
      blocklens[n] = int(r);
      offsets[n] = MPI_Aint((displ + q * chunk) * elem);
      types[n++] = base;
    }
    MPI_Datatype span;
    check(MPI_Type_create_struct(n, blocklens, offsets, types, &span), collective);
    created.push_back(span);
    check(MPI_Type_commit(&span), collective);
    return span;
  };
  const size_t p = size_t(size_);
  std::vector<int> send_n(p), recv_n(p), zero(p, 0);
  std::vector<MPI_Datatype> send_t(p), recv_t(p);
  try {
    for (size_t j = 0; j < p; j++) {
      send_n[j] = send_counts[j] > 0 ? 1 : 0;
      recv_n[j] = recv_counts[j] > 0 ? 1 : 0;
      send_t[j] = span_type(send_displs[j], send_counts[j]);
      recv_t[j] = span_type(recv_displs[j], recv_counts[j]);
    }
    check(MPI_Alltoallw(send, send_n.data(), zero.data(), send_t.data(), recv, recv_n.data(),
                        zero.data(), recv_t.data(), comm_),
          collective);
  } catch (...) {
    release();
    throw;
  }
  release();
}

void MpiCommunicator::all_reduce(const void* send, void* recv, size_t count_, DType t,
                                 ReduceOp op) {
  const char* what = "all_reduce";
  if (!reducible(t)) fail(what, fmt::format("unsupported dtype {} for a reduction", dtype_name(t)));
  if (op == ReduceOp::avg && !floating(t))
    fail(what, fmt::format("avg needs f32 or f64, got {}", dtype_name(t)));
  const size_t elem = dtype_size(t);
  if (count_ > 0 && (!send || !recv)) fail(what, "null buffer");
  const bool in_place = send == recv;
  if (!in_place && overlap(send, count_ * elem, recv, count_ * elem))
    fail(what, "send and recv partially overlap (in place needs send == recv)");
  for (size_t off = 0; off < count_; off += max_int_count_) {
    const int n = int(std::min(max_int_count_, count_ - off));
    check(MPI_Allreduce(in_place ? MPI_IN_PLACE : at(send, off, elem), at(recv, off, elem), n,
                        mpi_type(t), mpi_op(op), comm_),
          what);
  }
  if (op == ReduceOp::avg) divide_in_place(recv, count_, t, size_);
  count(Collective::all_reduce, comm_detail::all_reduce_bytes(size_, count_, elem));
}

void MpiCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType t,
                                     ReduceOp op) {
  const char* what = "reduce_scatter";
  if (!reducible(t)) fail(what, fmt::format("unsupported dtype {} for a reduction", dtype_name(t)));
  if (op == ReduceOp::avg && !floating(t))
    fail(what, fmt::format("avg needs f32 or f64, got {}", dtype_name(t)));
  const size_t elem = dtype_size(t), p = size_t(size_);
  if (recv_count > 0 && (!send || !recv)) fail(what, "null buffer");
  // In place (send == recv): recv holds all p blocks on entry and block rank's result in its
  // first recv_count elements on return.
  const bool in_place = send == recv;
  if (!in_place && overlap(send, p * recv_count * elem, recv, recv_count * elem))
    fail(what, "send and recv partially overlap (in place needs send == recv)");
  if (recv_count <= max_int_count_) {
    check(MPI_Reduce_scatter_block(in_place ? MPI_IN_PLACE : send, recv, int(recv_count),
                                   mpi_type(t), mpi_op(op), comm_),
          what);
  } else {
    // One reduction per destination block, in chunks that fit an int.
    const void* input = in_place ? recv : send;
    for (size_t i = 0; i < p; i++) {
      const bool mine = int(i) == rank_;
      for (size_t off = 0; off < recv_count; off += max_int_count_) {
        const int n = int(std::min(max_int_count_, recv_count - off));
        const void* block = at(input, i * recv_count + off, elem);
        if (mine && in_place) {
          check(MPI_Reduce(MPI_IN_PLACE, const_cast<void*>(block), n, mpi_type(t), mpi_op(op),
                           int(i), comm_),
                what);
        } else {
          check(MPI_Reduce(block, mine ? at(recv, off, elem) : nullptr, n, mpi_type(t),
                           mpi_op(op), int(i), comm_),
                what);
        }
      }
    }
    if (in_place && rank_ > 0)
      std::memmove(recv, at(recv, size_t(rank_) * recv_count, elem), recv_count * elem);
  }
  if (op == ReduceOp::avg) divide_in_place(recv, recv_count, t, size_);
  count(Collective::reduce_scatter, comm_detail::reduce_scatter_bytes(size_, recv_count, elem));
}

void MpiCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType t) {
  const char* what = "all_gather";
  const size_t elem = dtype_size(t), p = size_t(size_);
  if (send_count > 0 && (!send || !recv)) fail(what, "null buffer");
  // In place: this rank's block already sits at its slot of recv.
  void* own_slot = at(recv, size_t(rank_) * send_count, elem);
  const bool in_place = send == own_slot;
  if (!in_place && overlap(send, send_count * elem, recv, p * send_count * elem))
    fail(what, "send overlaps recv (in place needs send == recv + rank * send_count)");
  if (send_count <= max_int_count_) {
    check(MPI_Allgather(in_place ? MPI_IN_PLACE : send, int(send_count), mpi_type(t), recv,
                        int(send_count), mpi_type(t), comm_),
          what);
  } else {
    if (!in_place) std::memcpy(own_slot, send, send_count * elem);
    for (size_t i = 0; i < p; i++) {
      for (size_t off = 0; off < send_count; off += max_int_count_) {
        const int n = int(std::min(max_int_count_, send_count - off));
        check(MPI_Bcast(at(recv, i * send_count + off, elem), n, mpi_type(t), int(i), comm_),
              what);
      }
    }
  }
  count(Collective::all_gather, comm_detail::all_gather_bytes(size_, send_count, elem));
}

void MpiCommunicator::broadcast(void* buf, size_t count_, DType t, int root) {
  const char* what = "broadcast";
  if (root < 0 || root >= size_) fail(what, fmt::format("root {} is not a rank of the group", root));
  if (count_ > 0 && !buf) fail(what, "null buffer");
  const size_t elem = dtype_size(t);
  for (size_t off = 0; off < count_; off += max_int_count_) {
    const int n = int(std::min(max_int_count_, count_ - off));
    check(MPI_Bcast(at(buf, off, elem), n, mpi_type(t), root, comm_), what);
  }
  count(Collective::broadcast, comm_detail::broadcast_bytes(size_, rank_, root, count_, elem));
}

void MpiCommunicator::barrier() { check(MPI_Barrier(comm_), "barrier"); }

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, std::string name) {
  return std::make_unique<MpiCommunicator>(comm, std::move(name));
}

}  // namespace ulysses
