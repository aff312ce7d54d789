// The Ulysses all-to-alls (DeepSpeed-Ulysses, arXiv 2309.14509). Around attention, each rank of a
// sequence-parallel group of P ranks trades its N/P tokens of all heads for all N tokens of its
// share of the heads, and back:
//
//   #1  qkv  [B, N/P, Hq + 2 Hkv, d]  ->  [B, N, hq + 2 hkv, d]   scatter heads, gather sequence
//       attention on the full sequence for this rank's hq query heads (and hkv key/value heads)
//   #2  out  [B, N, hq, d]            ->  [B, N/P, Hq, d]         scatter sequence, gather heads
//
// backward runs the opposite all-to-all for each. Q, K and V travel in one collective.
//
// Head assignment (UlyssesHeadPlan): query heads are split into contiguous ranges, Hq/P each and
// one more for the first Hq % P ranks (uneven heads use per-peer counts). Each rank receives the
// key/value heads its query heads use; when a key/value head serves query heads on several ranks
// (GQA with Hkv < P, or ranges that straddle a group) it is sent to each of them, and its
// gradients from those ranks are summed on the way back.
//
// Devices: the send/recv scratch and the tensors live on the model's device and have its
// activation dtype (bf16 on cuda); the communicator gets device pointers there (NCCL), on the
// model's stream (GPT calls Communicator::set_stream). The pack / unpack ops read the head maps
// on the tensors' device: on cuda this class copies them once, at construction, into a small
// device arena.
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/arena.h"
#include "kernels/ops.h"

namespace ulysses {

struct UlyssesHeadPlan {
  int P = 1, Hq = 0, Hkv = 0;
  std::vector<int> q_begin, q_count;        // per peer: its query heads [q_begin, q_begin + q_count)
  std::vector<std::vector<int>> kv_heads;   // per peer: the global key/value head of each local slot
  // Heads of the packed local qkv [Hq + 2 Hkv] that each peer takes, in its local order
  // (its q heads, then its k heads, then its v heads): peer p's are
  // qkv_heads[qkv_offsets[p] .. qkv_offsets[p + 1]).
  std::vector<int32_t> qkv_heads;
  std::vector<int64_t> qkv_offsets;
  // Heads of the attention output [Hq] that each peer computes (its query heads).
  std::vector<int32_t> out_heads;
  std::vector<int64_t> out_offsets;

  int local_q_heads(int rank) const { return q_count[rank]; }
  int local_kv_heads(int rank) const { return int(kv_heads[rank].size()); }
};

// Throws UserError when P > Hq (a rank would get no query head) or Hq % Hkv != 0.
UlyssesHeadPlan plan_ulysses_heads(int Hq, int Hkv, int P);

// Bytes one rank sends in the four all-to-alls of one layer (forward #1, #2 and their backward)
// for micro-batch B, local tokens T, head dim d, element size `elem`; the formula that the
// communication counters are checked against (docs/sequence-parallelism.md).
uint64_t ulysses_layer_bytes_sent(const UlyssesHeadPlan& plan, int rank, int B, int T, int d, size_t elem);

class UlyssesAllToAll {
 public:
  // seq: the sequence-parallel communicator (size P). send/recv: scratch of at least
  // scratch_elements() each, on the model's device. T = N/P local tokens. ctx: the model's
  // context; on cuda the head maps are copied to the device with it (waits for the copy); null or
  // cpu: the pack / unpack ops read the plan's host arrays.
  UlyssesAllToAll(Communicator* seq, UlyssesHeadPlan plan, int B, int T, int d, ops::Context* ctx = nullptr);
  size_t scratch_elements() const;
  void set_scratch(Tensor send, Tensor recv) { send_ = send; recv_ = recv; }

  // #1 forward: qkv_local [B, T, Hq+2Hkv, d] -> qkv_full [B, N, hq+2hkv, d]
  void all_to_all_qkv_heads_to_seq(ops::Context& ctx, Tensor qkv_full, Tensor qkv_local);
  // #1 backward: dqkv_full [B, N, hq+2hkv, d] -> dqkv_local [B, T, Hq+2Hkv, d] (overwritten;
  // replicated key/value heads sum their gradients)
  void all_to_all_qkv_seq_to_heads(ops::Context& ctx, Tensor dqkv_local, Tensor dqkv_full);
  // #2 forward: out_full [B, N, hq, d] -> out_local [B, T, Hq, d]
  void all_to_all_out_seq_to_heads(ops::Context& ctx, Tensor out_local, Tensor out_full);
  // #2 backward: dout_local [B, T, Hq, d] -> dout_full [B, N, hq, d]
  void all_to_all_out_heads_to_seq(ops::Context& ctx, Tensor dout_full, Tensor dout_local);

  const UlyssesHeadPlan& plan() const { return plan_; }
  // Tests corrupt the plan (a wrong head permutation) to prove the equivalence test bites (cpu
  // only: the device copy of the maps is made at construction).
  UlyssesHeadPlan& mutable_plan_for_testing() { return plan_; }

 private:
  // element counts/displacements of one all-to-all pattern
  struct Counts {
    std::vector<size_t> send_counts, send_displs, recv_counts, recv_displs;
  };
  void exchange(const Counts& c, DType t);
  // the head maps where the pack / unpack ops read them (device arrays on cuda)
  struct HeadMaps {
    const int32_t* qkv_heads;
    const int64_t* qkv_offsets;
    const int32_t* out_heads;
    const int64_t* out_offsets;
  };
  HeadMaps maps() const;

  Communicator* seq_;
  UlyssesHeadPlan plan_;
  int B_, T_, d_, rank_;
  Counts qkv_forward_, qkv_backward_, out_forward_, out_backward_;
  Tensor send_, recv_;
  // cuda: device copies of plan_'s qkv_heads, qkv_offsets, out_heads, out_offsets (the int64
  // offsets held as pairs of i32, a byte copy); empty on cpu
  Arena device_maps_;
  Tensor qkv_heads_dev_, qkv_offsets_dev_, out_heads_dev_, out_offsets_dev_;
};

}  // namespace ulysses
