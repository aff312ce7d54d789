// The Ulysses all-to-alls: head plan, per-peer counts, and pack -> all_to_allv -> unpack.
#include "comm/ulysses.h"

#include <algorithm>

#include "core/base/error.h"

namespace ulysses {

UlyssesHeadPlan plan_ulysses_heads(int Hq, int Hkv, int P) {
  if (P > Hq)
    throw_user_error("parallel.sequence = {} exceeds the {} query heads: Ulysses gives each rank at least one "
                     "head, so P can be at most model.n_head = {}",
                     P, Hq, Hq);
  if (Hkv <= 0 || Hq % Hkv != 0)
    throw_user_error("model.n_head = {} is not a multiple of model.n_kv_head = {}", Hq, Hkv);
  const int group = Hq / Hkv;  // query heads per key/value head
  UlyssesHeadPlan plan;
  plan.P = P;
  plan.Hq = Hq;
  plan.Hkv = Hkv;
  plan.qkv_offsets.push_back(0);
  plan.out_offsets.push_back(0);
  int q_begin = 0;
  for (int p = 0; p < P; ++p) {
    const int nq = Hq / P + (p < Hq % P ? 1 : 0);
    // the key/value head of each local query head, and the distinct ones (ascending)
    std::vector<int> kv_of_q(nq);
    for (int i = 0; i < nq; ++i) kv_of_q[i] = (q_begin + i) / group;
    std::vector<int> distinct = kv_of_q;
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    // The local attention maps local query head i to local kv slot i / (nq / nkv); that holds when
    // every distinct kv head serves the same number of local query heads. Otherwise each local
    // query head gets its own copy of its kv head (one slot per query head).
    const int nkv = int(distinct.size());
    bool uniform = nq % nkv == 0;
    for (int i = 0; uniform && i < nq; ++i) uniform = kv_of_q[i] == distinct[i / (nq / nkv)];
    plan.q_begin.push_back(q_begin);
    plan.q_count.push_back(nq);
    plan.kv_heads.push_back(uniform ? distinct : kv_of_q);

    for (int i = 0; i < nq; ++i) plan.qkv_heads.push_back(q_begin + i);
    for (int kv : plan.kv_heads.back()) plan.qkv_heads.push_back(Hq + kv);
    for (int kv : plan.kv_heads.back()) plan.qkv_heads.push_back(Hq + Hkv + kv);
    plan.qkv_offsets.push_back(int64_t(plan.qkv_heads.size()));
    for (int i = 0; i < nq; ++i) plan.out_heads.push_back(q_begin + i);
    plan.out_offsets.push_back(int64_t(plan.out_heads.size()));
    q_begin += nq;
  }
  return plan;
}

uint64_t ulysses_layer_bytes_sent(const UlyssesHeadPlan& plan, int rank, int B, int T, int d, size_t elem) {
  const uint64_t token_head = uint64_t(B) * T * d * elem;  // one head of the local tokens
  const int P = plan.P;
  const uint64_t local_qkv = uint64_t(plan.qkv_offsets[rank + 1] - plan.qkv_offsets[rank]);
  const uint64_t local_q = uint64_t(plan.q_count[rank]);
  uint64_t bytes = 0;
  for (int p = 0; p < P; ++p) {
    if (p == rank) continue;
    bytes += token_head * uint64_t(plan.qkv_offsets[p + 1] - plan.qkv_offsets[p]);  // #1 forward
    bytes += token_head * local_qkv;                                                 // #1 backward
    bytes += token_head * local_q;                                                   // #2 forward
    bytes += token_head * uint64_t(plan.q_count[p]);                                 // #2 backward
  }
  return bytes;
}

UlyssesAllToAll::UlyssesAllToAll(Communicator* seq, UlyssesHeadPlan plan, int B, int T, int d, ops::Context* ctx,
                                 int chunks)
    : seq_(seq), plan_(std::move(plan)), B_(B), T_(T), d_(d), rank_(seq->rank()), K_(chunks) {
  ULYSSES_ASSERT(seq->size() == plan_.P, "sequence group of {} ranks, head plan for {}", seq->size(), plan_.P);
  ULYSSES_ASSERT(chunks >= 1 && chunks <= T, "all-to-all chunks {} outside [1, T = {}]", chunks, T);
  const int P = plan_.P;
  const size_t BTd = size_t(B) * T * d;  // elements of one head over the local tokens
  const size_t my_qkv = size_t(plan_.qkv_offsets[rank_ + 1] - plan_.qkv_offsets[rank_]);
  const size_t my_q = size_t(plan_.q_count[rank_]);
  // Every pattern's buffers are P blocks [B, T, n, d] (n heads per token) one after another, the
  // block of peer p starting at head offset o: B*T*d*o elements. Per pattern and peer: the
  // {n, o} of what is sent to p and of what is received from p.
  struct Side {
    size_t n, o;
  };
  struct PeerBlocks {
    Side send, recv;
  };
  std::vector<PeerBlocks> table[4];
  for (int p = 0; p < P; ++p) {
    const size_t n_qkv = size_t(plan_.qkv_offsets[p + 1] - plan_.qkv_offsets[p]);
    const size_t n_q = size_t(plan_.q_count[p]);
    const Side their_qkv{n_qkv, size_t(plan_.qkv_offsets[p])}, my_qkv_from_p{my_qkv, my_qkv * p};
    const Side their_q{n_q, size_t(plan_.out_offsets[p])}, my_q_from_p{my_q, my_q * p};
    // #1 forward: peer p gets its heads of my tokens; I get my heads of peer p's tokens.
    table[qkv_forward].push_back({their_qkv, my_qkv_from_p});
    // #1 backward: the reverse.
    table[qkv_backward].push_back({my_qkv_from_p, their_qkv});
    // #2 forward: peer p gets my heads of its tokens; I get its heads of my tokens.
    table[out_forward].push_back({my_q_from_p, their_q});
    // #2 backward: the reverse.
    table[out_backward].push_back({their_q, my_q_from_p});
  }
  // Rows [t0, t0 + n) of batch row b (b = -1: all rows) of every block: the whole block, or the
  // run of n*n_p*d elements at row b*T + t0 of it.
  auto counts = [&](const std::vector<PeerBlocks>& peers, int b, int t0, int n) {
    Counts c;
    for (const PeerBlocks& pb : peers) {
      const size_t first = b < 0 ? 0 : (size_t(b) * T + size_t(t0)) * d;  // x n heads
      const size_t rows = b < 0 ? size_t(B) * T : size_t(n);
      c.send_counts.push_back(rows * d * pb.send.n);
      c.send_displs.push_back(BTd * pb.send.o + first * pb.send.n);
      c.recv_counts.push_back(rows * d * pb.recv.n);
      c.recv_displs.push_back(BTd * pb.recv.o + first * pb.recv.n);
    }
    return c;
  };
  qkv_forward_ = counts(table[qkv_forward], -1, 0, 0);
  qkv_backward_ = counts(table[qkv_backward], -1, 0, 0);
  out_forward_ = counts(table[out_forward], -1, 0, 0);
  out_backward_ = counts(table[out_backward], -1, 0, 0);
  if (K_ > 1) {
    // K ranges per batch row, the first T % K one token longer
    for (int b = 0; b < B; ++b)
      for (int k = 0; k < K_; ++k)
        chunks_.push_back({b, k * (T / K_) + std::min(k, T % K_), T / K_ + (k < T % K_ ? 1 : 0)});
    for (int pat = 0; pat < 4; ++pat)
      for (const ops::TokenRows& r : chunks_)
        chunk_counts_[pat].push_back(counts(table[pat], r.b, r.t_begin, r.t_count));
    if (ctx && ctx->device == Device::cuda)
      comm_stream_ = std::make_unique<CommStream>(ctx->stream(), num_chunks(), /*host_wait=*/false);
    else
      for (size_t c = 0; c < chunks_.size(); ++c) requests_.push_back(seq_->make_request());
  }
  if (ctx && ctx->device == Device::cuda) upload_head_maps(*ctx);
}

// The four maps as i32 rows (an int64 offset is two i32), copied once to a device arena.
void UlyssesAllToAll::upload_head_maps(ops::Context& ctx) {
  auto host = [](const auto& v) {
    const int64_t n = int64_t(v.size() * sizeof(v[0]) / 4);
    return Tensor(const_cast<void*>(static_cast<const void*>(v.data())), {n}, DType::i32, Device::cpu);
  };
  const Tensor src[4] = {host(plan_.qkv_heads), host(plan_.qkv_offsets), host(plan_.out_heads),
                         host(plan_.out_offsets)};
  Tensor* dst[4] = {&qkv_heads_dev_, &qkv_offsets_dev_, &out_heads_dev_, &out_offsets_dev_};
  device_maps_ = Arena("Ulysses head maps", Device::cuda);
  size_t offsets[4];
  for (int i = 0; i < 4; ++i) offsets[i] = device_maps_.reserve(src[i].bytes());
  device_maps_.allocate(/*zero=*/false);
  for (int i = 0; i < 4; ++i) {
    *dst[i] = device_maps_.tensor(offsets[i], {src[i].numel()}, DType::i32);
    ops::copy(ctx, *dst[i], src[i]);
  }
  ops::synchronize(ctx);  // from pageable host memory: done before anything can change plan_
}

UlyssesAllToAll::HeadMaps UlyssesAllToAll::maps() const {
  if (device_maps_.base() == nullptr)
    return {plan_.qkv_heads.data(), plan_.qkv_offsets.data(), plan_.out_heads.data(), plan_.out_offsets.data()};
  return {static_cast<const int32_t*>(qkv_heads_dev_.data), static_cast<const int64_t*>(qkv_offsets_dev_.data),
          static_cast<const int32_t*>(out_heads_dev_.data), static_cast<const int64_t*>(out_offsets_dev_.data)};
}

size_t UlyssesAllToAll::scratch_elements() const {
  const size_t block = size_t(B_) * T_ * d_;
  const size_t my_qkv = size_t(plan_.qkv_offsets[rank_ + 1] - plan_.qkv_offsets[rank_]);
  const size_t sent_qkv = size_t(plan_.qkv_offsets[plan_.P]);
  return block * std::max({sent_qkv, my_qkv * plan_.P, size_t(plan_.Hq), size_t(plan_.q_count[rank_]) * plan_.P});
}

void UlyssesAllToAll::exchange(const Counts& c, DType t) {
  seq_->all_to_allv(send_.data, c.send_counts.data(), c.send_displs.data(), recv_.data, c.recv_counts.data(),
                    c.recv_displs.data(), t);
}

UlyssesAllToAll::~UlyssesAllToAll() = default;

void UlyssesAllToAll::start(ops::Context& ctx, Pattern p, int c, DType t) {
  ULYSSES_ASSERT(!comm_stream_ || comm_stream_->model_stream() == ctx.stream(), "chunked all-to-all on another stream");
  const Counts& n = chunk_counts_[p][size_t(c)];
  if (comm_stream_) {
    comm_stream_->run(*seq_, c, [&] {
      seq_->all_to_allv(send_.data, n.send_counts.data(), n.send_displs.data(), recv_.data, n.recv_counts.data(),
                        n.recv_displs.data(), t);
    });
  } else {
    seq_->start_all_to_allv(*requests_[size_t(c)], send_.data, n.send_counts.data(), n.send_displs.data(),
                            recv_.data, n.recv_counts.data(), n.recv_displs.data(), t);
  }
}

void UlyssesAllToAll::wait(ops::Context& ctx, int c) {
  (void)ctx;
  if (comm_stream_)
    comm_stream_->model_waits(c);
  else
    seq_->wait(*requests_[size_t(c)]);
}

// F1: [B, T, Hq+2Hkv, d] rows of chunk c -> their place in P blocks [B, T, n_p, d] -> exchange
void UlyssesAllToAll::qkv_heads_to_seq_start_chunk(ops::Context& ctx, int c, Tensor qkv_local) {
  const HeadMaps m = maps();
  ops::ulysses_pack_heads(ctx, send_, qkv_local, m.qkv_heads, m.qkv_offsets, plan_.P, chunk(c));
  start(ctx, qkv_forward, c, qkv_local.dtype);
}

// F1: P blocks [B, T, n_me, d] -> [B, N, n_me, d]
void UlyssesAllToAll::qkv_heads_to_seq_finish(ops::Context& ctx, Tensor qkv_full) {
  for (int c = 0; c < num_chunks(); ++c) wait(ctx, c);
  ops::ulysses_unpack_sequence(ctx, qkv_full, recv_, plan_.P);
}

// F2: [B, N, hq, d] -> P blocks [B, T, hq, d] -> every chunk's exchange
void UlyssesAllToAll::out_seq_to_heads_start(ops::Context& ctx, Tensor out_full) {
  ops::ulysses_pack_sequence(ctx, send_, out_full, plan_.P);
  for (int c = 0; c < num_chunks(); ++c) start(ctx, out_forward, c, out_full.dtype);
}

// F2: chunk c's rows of P blocks [B, T, nq_p, d] -> its rows of [B, T, Hq, d]
void UlyssesAllToAll::out_seq_to_heads_finish_chunk(ops::Context& ctx, int c, Tensor out_local) {
  const HeadMaps m = maps();
  wait(ctx, c);
  ops::ulysses_unpack_heads(ctx, out_local, recv_, m.out_heads, m.out_offsets, plan_.P, /*accumulate=*/false, chunk(c));
}

// B2: [B, T, Hq, d] rows of chunk c -> their place in P blocks [B, T, nq_p, d] -> exchange
void UlyssesAllToAll::out_heads_to_seq_start_chunk(ops::Context& ctx, int c, Tensor dout_local) {
  const HeadMaps m = maps();
  ops::ulysses_pack_heads(ctx, send_, dout_local, m.out_heads, m.out_offsets, plan_.P, chunk(c));
  start(ctx, out_backward, c, dout_local.dtype);
}

// B2: P blocks [B, T, hq, d] -> [B, N, hq, d]
void UlyssesAllToAll::out_heads_to_seq_finish(ops::Context& ctx, Tensor dout_full) {
  for (int c = 0; c < num_chunks(); ++c) wait(ctx, c);
  ops::ulysses_unpack_sequence(ctx, dout_full, recv_, plan_.P);
}

// B1: [B, N, hq+2hkv, d] -> P blocks [B, T, n_me, d] -> every chunk's exchange
void UlyssesAllToAll::qkv_seq_to_heads_start(ops::Context& ctx, Tensor dqkv_full) {
  ops::ulysses_pack_sequence(ctx, send_, dqkv_full, plan_.P);
  for (int c = 0; c < num_chunks(); ++c) start(ctx, qkv_backward, c, dqkv_full.dtype);
}

// B1: chunk c's rows of P blocks [B, T, n_p, d] -> summed into its rows of [B, T, Hq+2Hkv, d]
void UlyssesAllToAll::qkv_seq_to_heads_finish_chunk(ops::Context& ctx, int c, Tensor dqkv_local) {
  const HeadMaps m = maps();
  wait(ctx, c);
  ops::ulysses_unpack_heads(ctx, dqkv_local, recv_, m.qkv_heads, m.qkv_offsets, plan_.P, /*accumulate=*/true,
                            chunk(c));
}

void UlyssesAllToAll::all_to_all_qkv_heads_to_seq(ops::Context& ctx, Tensor qkv_full, Tensor qkv_local) {
  const HeadMaps m = maps();
  // [B, T, Hq+2Hkv, d] -> P blocks [B, T, n_p, d] -> exchange -> P blocks [B, T, n_me, d] -> [B, N, n_me, d]
  ops::ulysses_pack_heads(ctx, send_, qkv_local, m.qkv_heads, m.qkv_offsets, plan_.P);
  exchange(qkv_forward_, qkv_local.dtype);
  ops::ulysses_unpack_sequence(ctx, qkv_full, recv_, plan_.P);
}

void UlyssesAllToAll::all_to_all_qkv_seq_to_heads(ops::Context& ctx, Tensor dqkv_local, Tensor dqkv_full) {
  const HeadMaps m = maps();
  // [B, N, n_me, d] -> P blocks [B, T, n_me, d] -> exchange -> P blocks [B, T, n_p, d] -> sum into [B, T, Hq+2Hkv, d]
  ops::ulysses_pack_sequence(ctx, send_, dqkv_full, plan_.P);
  exchange(qkv_backward_, dqkv_full.dtype);
  ops::fill_zero(ctx, dqkv_local);
  ops::ulysses_unpack_heads(ctx, dqkv_local, recv_, m.qkv_heads, m.qkv_offsets, plan_.P,
                            /*accumulate=*/true);
}

void UlyssesAllToAll::all_to_all_out_seq_to_heads(ops::Context& ctx, Tensor out_local, Tensor out_full) {
  const HeadMaps m = maps();
  // [B, N, hq, d] -> P blocks [B, T, hq, d] -> exchange -> P blocks [B, T, nq_p, d] -> [B, T, Hq, d]
  ops::ulysses_pack_sequence(ctx, send_, out_full, plan_.P);
  exchange(out_forward_, out_full.dtype);
  ops::ulysses_unpack_heads(ctx, out_local, recv_, m.out_heads, m.out_offsets, plan_.P,
                            /*accumulate=*/false);
}

void UlyssesAllToAll::all_to_all_out_heads_to_seq(ops::Context& ctx, Tensor dout_full, Tensor dout_local) {
  const HeadMaps m = maps();
  // [B, T, Hq, d] -> P blocks [B, T, nq_p, d] -> exchange -> P blocks [B, T, hq, d] -> [B, N, hq, d]
  ops::ulysses_pack_heads(ctx, send_, dout_local, m.out_heads, m.out_offsets, plan_.P);
  exchange(out_backward_, dout_local.dtype);
  ops::ulysses_unpack_sequence(ctx, dout_full, recv_, plan_.P);
}

}  // namespace ulysses
