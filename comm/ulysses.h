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
//
// Chunked all-to-alls (runtime.all_to_all_chunks = K > 1): each batch row's T local tokens are
// cut into K contiguous ranges (the first T % K one token longer), so the B*K chunks of a layer's
// all-to-all are B*K smaller all_to_allv calls, and GPT (core/gpt.cpp) pipelines them with the
// GEMM on the same rows. The send / recv layout is the one of K = 1 (P blocks [B, T, n_p, d]),
// in which the part of chunk (b, rows) for peer p is one contiguous run: every chunk is one
// all_to_allv, its counts and displacements precomputed here. The four pipelines (F = forward,
// B = backward; "start c" = the exchange of chunk c begins, "wait c" = the model may use it):
//
//   F1 (#1 fwd)  model: [qkv GEMM, rope, pack c0][start c0][GEMM, rope, pack c1][start c1] .. [wait all][unpack]
//                comm:                               [--- exchange c0 ---]         [--- exchange c1 ---]
//   F2 (#2 fwd)  model: [pack][start all][wait c0][unpack c0, attproj GEMM c0][wait c1][unpack c1, GEMM c1] ..
//                comm:                   [exchange c0][exchange c1][exchange c2] ..
//   B2 (#2 bwd)  model: [dinp GEMM c0, pack c0][start c0][dinp GEMM c1, pack c1][start c1] .. [dWo GEMM][wait all][unpack]
//                comm:                                   [--- exchange c0 ---]            [--- exchange c1 ---]
//   B1 (#1 bwd)  model: [pack][start all][zero][wait c0][unpack c0 (+=), rope bwd, dinp GEMM c0][wait c1] .. [dWqkv GEMM]
//                comm:                   [exchange c0][exchange c1][exchange c2] ..
//
// How a chunk's exchange runs beside the model's work, per device:
//   cpu:  Communicator::start_all_to_allv / wait, one CommRequest per chunk made here once
//         (MpiCommunicator: MPI_Ialltoallv; the others complete it in start).
//   cuda: a CommStream (comm/comm_stream.h) owned here, one event per chunk. start c:
//         CommStream::run: the comm stream follows the model stream (so the exchange comes after
//         the pack), the communicator's stream is set to the comm stream for the all_to_allv
//         (NCCL enqueues it there; the emulated communicator copies there; the staged MPI one
//         blocks the host, correct but without overlap) and set back to the model stream right
//         after (every other use of the communicator stays on the model stream), then event c is
//         recorded. wait c: the model stream waits for event c. No host synchronisation
//         (host_wait false, also for a staged communicator: its next collective either runs on
//         the comm stream, after its own wait for that stream, or on the model stream after the
//         pipeline's waits below, so its pinned result buffer is never refilled under a copy).
//
// Why no buffer region is rewritten while an exchange may still read or write it (cuda; on the
// cpu wait() returns only when the exchange is over, and the same order holds):
//   * within a pipeline the chunks own disjoint regions of send and of recv ((b, rows) differ),
//     and a chunk's region is written by the model before its start (which the comm stream
//     follows: CommStream::comm_follows_model) and read by the model only after its wait;
//   * every pipeline ends with the model stream waiting for every chunk it started (F1 and B2
//     wait for all before unpack_sequence; F2 and B1 wait for each chunk in their loop), so
//     whatever the model enqueues next (the next pipeline's pack, the next layer's, the next
//     micro-batch's, a recomputed forward) comes after all of those exchanges;
//   * every exchange starts after all the model's earlier work (comm_follows_model), so it comes
//     after the previous pipeline's unpack read recv.
// The same holds at K = 1, where everything runs on the model stream.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "comm/comm_stream.h"
#include "comm/communicator.h"
#include "core/base/arena.h"
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
  // chunks: runtime.all_to_all_chunks, K in [1, T] (K = 1: the whole-tensor calls only).
  UlyssesAllToAll(Communicator* seq, UlyssesHeadPlan plan, int B, int T, int d, ops::Context* ctx = nullptr,
                  int chunks = 1);
  ~UlyssesAllToAll();
  UlyssesAllToAll(const UlyssesAllToAll&) = delete;
  UlyssesAllToAll& operator=(const UlyssesAllToAll&) = delete;
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

  // ---- the chunked pipelines (K > 1; diagram above). Chunk c in [0, num_chunks()) is rows
  // chunk(c) of the [B, T, ...] tensors, b-major; its first row of the [B*T, ...] view is
  // first_row(c). Every pipeline is started and finished in the order below, chunks ascending.
  int chunks_per_row() const { return K_; }
  int num_chunks() const { return B_ * K_; }
  ops::TokenRows chunk(int c) const { return chunks_[size_t(c)]; }
  int64_t first_row(int c) const { return int64_t(chunks_[size_t(c)].b) * T_ + chunks_[size_t(c)].t_begin; }
  // F1: chunk c's rows of qkv_local [B, T, Hq+2Hkv, d] are final: pack them, start their exchange.
  void qkv_heads_to_seq_start_chunk(ops::Context& ctx, int c, Tensor qkv_local);
  // F1: wait for every chunk, qkv_full [B, N, hq+2hkv, d] = the received sequence.
  void qkv_heads_to_seq_finish(ops::Context& ctx, Tensor qkv_full);
  // F2: pack out_full [B, N, hq, d] whole and start every chunk.
  void out_seq_to_heads_start(ops::Context& ctx, Tensor out_full);
  // F2: wait for chunk c, write its rows of out_local [B, T, Hq, d].
  void out_seq_to_heads_finish_chunk(ops::Context& ctx, int c, Tensor out_local);
  // B2: chunk c's rows of dout_local [B, T, Hq, d] are final: pack them, start their exchange.
  void out_heads_to_seq_start_chunk(ops::Context& ctx, int c, Tensor dout_local);
  // B2: wait for every chunk, dout_full [B, N, hq, d] = the received sequence.
  void out_heads_to_seq_finish(ops::Context& ctx, Tensor dout_full);
  // B1: pack dqkv_full [B, N, hq+2hkv, d] whole and start every chunk.
  void qkv_seq_to_heads_start(ops::Context& ctx, Tensor dqkv_full);
  // B1: wait for chunk c, add its rows into dqkv_local [B, T, Hq+2Hkv, d] (which the caller zeroed).
  void qkv_seq_to_heads_finish_chunk(ops::Context& ctx, int c, Tensor dqkv_local);

  const UlyssesHeadPlan& plan() const { return plan_; }
  // Tests corrupt the plan (a wrong head permutation) to prove the equivalence test bites (cpu
  // only: the device copy of the maps is made at construction).
  UlyssesHeadPlan& mutable_plan_for_testing() { return plan_; }

  // element counts/displacements of one all_to_allv, per peer
  struct Counts {
    std::vector<size_t> send_counts, send_displs, recv_counts, recv_displs;
  };
  enum Pattern { qkv_forward = 0, qkv_backward = 1, out_forward = 2, out_backward = 3 };
  // Tests plant a wrong chunk displacement to prove the chunked equivalence test bites.
  Counts& mutable_chunk_counts_for_testing(Pattern p, int c) { return chunk_counts_[p][size_t(c)]; }

 private:
  // cuda: the head maps into device_maps_, for the layout kernels (the constructor calls it)
  void upload_head_maps(ops::Context& ctx);
  void exchange(const Counts& c, DType t);
  // the chunked exchanges: start chunk c of pattern p (send_ -> recv_), wait for chunk c
  void start(ops::Context& ctx, Pattern p, int c, DType t);
  void wait(ops::Context& ctx, int c);
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
  // chunked (K > 1): the chunks, each pattern's counts per chunk, and what runs them
  int K_ = 1;
  std::vector<ops::TokenRows> chunks_;
  std::vector<Counts> chunk_counts_[4];                // [pattern][chunk]
  std::vector<std::unique_ptr<CommRequest>> requests_;  // cpu: one per chunk
  std::unique_ptr<CommStream> comm_stream_;             // cuda: event c = chunk c's exchange done
  // cuda: device copies of plan_'s qkv_heads, qkv_offsets, out_heads, out_offsets (the int64
  // offsets held as pairs of i32, a byte copy); empty on cpu
  Arena device_maps_;
  Tensor qkv_heads_dev_, qkv_offsets_dev_, out_heads_dev_, out_offsets_dev_;
};

}  // namespace ulysses
