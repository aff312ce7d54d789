// The Ulysses all-to-alls: head plan, per-peer counts, and pack -> all_to_allv -> unpack.
#include "comm/ulysses.h"

#include <algorithm>

#include "core/error.h"

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

UlyssesAllToAll::UlyssesAllToAll(Communicator* seq, UlyssesHeadPlan plan, int B, int T, int d, ops::Context* ctx)
    : seq_(seq), plan_(std::move(plan)), B_(B), T_(T), d_(d), rank_(seq->rank()) {
  ULYSSES_ASSERT(seq->size() == plan_.P, "sequence group of {} ranks, head plan for {}", seq->size(), plan_.P);
  const int P = plan_.P;
  const size_t block = size_t(B) * T * d;  // elements of one head over the local tokens
  const size_t my_qkv = size_t(plan_.qkv_offsets[rank_ + 1] - plan_.qkv_offsets[rank_]);
  const size_t my_q = size_t(plan_.q_count[rank_]);
  auto add = [](Counts& c, size_t sc, size_t sd, size_t rc, size_t rd) {
    c.send_counts.push_back(sc);
    c.send_displs.push_back(sd);
    c.recv_counts.push_back(rc);
    c.recv_displs.push_back(rd);
  };
  for (int p = 0; p < P; ++p) {
    const size_t n_qkv = size_t(plan_.qkv_offsets[p + 1] - plan_.qkv_offsets[p]);
    const size_t n_q = size_t(plan_.q_count[p]);
    // #1 forward: peer p gets its heads of my tokens; I get my heads of peer p's tokens.
    add(qkv_forward_, block * n_qkv, block * size_t(plan_.qkv_offsets[p]), block * my_qkv, block * my_qkv * p);
    // #1 backward: the reverse.
    add(qkv_backward_, block * my_qkv, block * my_qkv * p, block * n_qkv, block * size_t(plan_.qkv_offsets[p]));
    // #2 forward: peer p gets my heads of its tokens; I get its heads of my tokens.
    add(out_forward_, block * my_q, block * my_q * p, block * n_q, block * size_t(plan_.out_offsets[p]));
    // #2 backward: the reverse.
    add(out_backward_, block * n_q, block * size_t(plan_.out_offsets[p]), block * my_q, block * my_q * p);
  }
  if (ctx && ctx->device == Device::cuda) {
    // the four maps as i32 rows (an int64 offset is two i32), copied once to a device arena
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
      ops::copy(*ctx, *dst[i], src[i]);
    }
    ops::synchronize(*ctx);  // from pageable host memory: done before anything can change plan_
  }
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
