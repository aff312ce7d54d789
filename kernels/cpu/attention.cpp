// Causal multi-head attention with GQA, flash-style, fp32 CPU reference.
//
// qkv: [B, N, Hq + 2*Hkv, d] packed; query head h uses key/value head h / (Hq/Hkv).
// out: [B, N, Hq, d]; lse: [B, Hq, N] = log sum_j exp(s_ij), s_ij = q_i·k_j / sqrt(d), j <= i.
//
// Forward, per (batch, query head, query tile of kTile rows): walk the key tiles left of and on
// the diagonal, keep a running row max m and sum l (online softmax) and an unnormalised output
// accumulator; key tiles above the diagonal are never touched, the diagonal tile is masked
// inside. Nothing of size N×N is ever allocated: K^T and V (backward: K^T, V^T and K) are
// rearranged once per call into buffers as large as K (rearrange_heads), and the per-thread work
// buffers are O(kTile·d) (forward) or O(N·d) (fused backward: one query head's Q, dO, dQ and one
// kv head's dK, dV whole; at most 64 MiB per thread, beyond which the split schedule runs). All
// of it lives in one scratch the caller passes (ForwardScratch, BackwardScratch: the model's
// context keeps one, so a step does not allocate; allocating it per call cost 3 % of the forward
// at N = 4096 and 15 % at N = 64, 2 threads).
//
// Backward: for every query head of the group, key tile j and query tile i >= j, recompute
// P = exp(S - lse) and
//   dV_j += P^T dO_i;  dP = dO_i V_j^T;  dS = P * (dP - D_i)   with D_i = rowsum(dO_i * O_i)
//   dQ_i += dS K_j;  dK_j += dS^T Q_i / sqrt(d)   (Q loaded scaled; dq = dQ / sqrt(d) at the end).
// Two schedules (attention_backward picks one by how many threads B * Hkv tasks would keep busy):
//   fused: one task per (batch, kv head) does all of it (5 tile products per tile pair);
//   split: parallel over (batch, kv head, key tile) for dK and dV, then over (batch, query head,
//          query tile) for dQ, which recomputes P and dS (7 tile products per pair), so B = 1 with
//          one kv head still uses every thread.
// In both every row of dq, dk, dv is written by one task, dQ_i is summed over key tiles
// j = 0, 1, ..., i in that order and dK_j, dV_j over (query head, query tile) in that order, with
// the same arithmetic: there are no races and the result is bitwise the same for any thread
// count and either schedule (tested).
//
// Stages: rearrange the keys and values once per call and load the query side once per task (zero-
// padded to the micro-kernel's 4-row blocking, head dimension padded to dp = round_up(d, 8)), so
// that every tile operand is read in place; multiply tiles with tile_gemm (a register-blocked
// loop nest on 8-float AVX vectors); the softmax step on rows with the vectorisable exp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "core/base/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/vec_math.h"

namespace ulysses::cpu {

namespace {

constexpr int kTile = 64;  // rows per query tile and per key tile (equal: see `diagonal`)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Eight floats in one AVX register (GCC/Clang vector extension; the kernels are built for
// x86-64-v3, see kernels/CMakeLists.txt, else the compiler splits it into two SSE halves): the
// micro-kernel below is written with it so that its 4×16 accumulator block stays in eight
// registers whatever the loop bounds (written as plain loops, GCC vectorised the k loop instead,
// with spills).
typedef float f32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// One MR × (8·NV) block of C (+)= op(A) · B; op(A)[r, k] = a[r * lda + k], or a[k * lda + r]
// with kTransA. Each element is summed over k in order (the result does not depend on the
// blocking). 4 × 16 keeps 8 accumulators, 2 B vectors and a broadcast in registers (6 × 16 with
// 12 accumulators measured no faster).
template <bool kAccumulate, bool kTransA, int MR, int NV>
inline void micro_kernel(float* __restrict c, int ldc, const float* __restrict a, int lda,
                         const float* __restrict b, int ldb, int K) {
  f32x8 acc[MR][NV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = kAccumulate ? load8(c + r * ldc + 8 * v) : f32x8{};
  for (int k = 0; k < K; k++) {
    f32x8 bv[NV];
    for (int v = 0; v < NV; v++) bv[v] = load8(b + k * ldb + 8 * v);
    for (int r = 0; r < MR; r++) {
      const float ar = kTransA ? a[k * lda + r] : a[r * lda + k];
      for (int v = 0; v < NV; v++) acc[r][v] += ar * bv[v];
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) store8(c + r * ldc + 8 * v, acc[r][v]);
}

// Rows [i, i + MR) of C (+)= op(A) · B over all N columns: 16 at a time, then 8.
template <bool kAccumulate, bool kTransA, int MR>
void row_block(float* __restrict C, int ldc, const float* __restrict A, int lda,
               const float* __restrict B, int ldb, int i, int N, int K) {
  const float* a = kTransA ? A + i : A + i * lda;
  int j = 0;
  for (; j + 16 <= N; j += 16)
    micro_kernel<kAccumulate, kTransA, MR, 2>(C + i * ldc + j, ldc, a, lda, B + j, ldb, K);
  for (; j < N; j += 8)
    micro_kernel<kAccumulate, kTransA, MR, 1>(C + i * ldc + j, ldc, a, lda, B + j, ldb, K);
}

// C[M, N] (+)= op(A)[M, K] · B[K, N], row-major with leading dimensions; M % 4 == 0, N % 8 == 0.
// op(A) = A [M, K], or with kTransA the transpose of A [K, M] (so P^T dO needs no transposed copy).
template <bool kAccumulate, bool kTransA = false>
void tile_gemm(float* __restrict C, int ldc, const float* __restrict A, int lda,
               const float* __restrict B, int ldb, int M, int N, int K) {
  for (int i = 0; i < M; i += 4) row_block<kAccumulate, kTransA, 4>(C, ldc, A, lda, B, ldb, i, N, K);
}

// Where row t of head `head` of batch b lives in a packed [B, N, H, d] buffer.
struct Packed {
  int N, H, d;
  int64_t offset(int b, int t, int head) const { return ((int64_t(b) * N + t) * H + head) * d; }
};

// dst[r, 0:dp] = scale * src(row0 + r)[0:d], zero-padded; rows [rows, rows_padded) are zero.
void load_rows(float* dst, int dp, const float* base, const Packed& p, int b, int row0, int head,
               int rows, int rows_padded, float scale) {
  for (int r = 0; r < rows; r++) {
    const float* src = base + p.offset(b, row0 + r, head);
    for (int c = 0; c < p.d; c++) dst[r * dp + c] = src[c] * scale;
    std::fill(dst + r * dp + p.d, dst + (r + 1) * dp, 0.0f);
  }
  std::fill(dst + rows * dp, dst + rows_padded * dp, 0.0f);
}

// The keys or values of heads [head0, head0 + n_heads) rearranged once per call, so that the
// tile products read their K, K^T or V tiles in place instead of copying (and for K^T
// transposing) one per tile pair, which took about as long as the products. A work-sharing loop
// over (batch, head, block of kTile rows) without a barrier: called by every thread of the
// caller's parallel region (no region of its own: under load each extra region costs a
// scheduler tick, which showed at N = 64), which then waits at a barrier before reading `out`.
// Rows [N, n_pad) and columns [d, dp) are zero.
//   transposed: out [B, n_heads, d, ld_t], out[b, k, c, t] = row t of head head0 + k, column c.
//     ld_t = n_pad + 16 (HeadStrides): a power-of-two row stride would put all 64 rows of a
//     K^T tile in the same few L1 sets.
//   else:       out [B, n_heads, n_pad, dp], contiguous rows (a 64-row tile is 64 · dp floats
//     in a row; read in place from the packed [B, N, H, d] buffer, a tile's rows are H · d floats
//     apart and conflict in L1 the same way).
struct HeadStrides {
  int n_pad, ld_t, dp;
  int64_t transposed_head() const { return int64_t(ld_t) * dp; }  // d <= dp rows used
  int64_t rows_head() const { return int64_t(n_pad) * dp; }
};

void rearrange_heads(float* out, bool transposed, const HeadStrides& hs, const float* qkv,
                     const Packed& p, int B, int head0, int n_heads) {
  const int blocks = hs.n_pad / kTile;
#pragma omp for schedule(static) nowait
  for (int64_t task = 0; task < int64_t(B) * n_heads * blocks; task++) {
    const int blk = int(task % blocks), k = int((task / blocks) % n_heads);
    const int b = int(task / (int64_t(blocks) * n_heads));
    const int t0 = blk * kTile, rows = std::min(kTile, std::max(0, p.N - t0));
    const int64_t head = int64_t(b) * n_heads + k;
    if (transposed) {
      float* dst = out + head * hs.transposed_head();
      for (int r = 0; r < rows; r++) {
        const float* src = qkv + p.offset(b, t0 + r, head0 + k);
        for (int c = 0; c < p.d; c++) dst[int64_t(c) * hs.ld_t + t0 + r] = src[c];
      }
      for (int c = 0; c < p.d; c++)
        std::fill(dst + int64_t(c) * hs.ld_t + t0 + rows, dst + int64_t(c) * hs.ld_t + t0 + kTile, 0.0f);
    } else {
      load_rows(out + head * hs.rows_head() + int64_t(t0) * hs.dp, hs.dp, qkv, p, b, t0, head0 + k,
                rows, kTile, 1.0f);
    }
  }
}

// Floats rounded up to whole 64-byte cache lines, so that no two threads' areas share a line.
size_t whole_lines(size_t floats) { return (floats + 15) / 16 * 16; }

// The forward's scratch: K^T [B, Hkv, dp, ld_t] and V [B, Hkv, n_pad, dp], then one area per
// thread: Q and the output accumulator [kTile, dp], S [kTile, kTile], m and l [kTile].
struct ForwardScratch {
  HeadStrides hs;
  size_t kt, v, per_thread;  // floats
  static ForwardScratch of(int B, int N, int Hkv, int d) {
    const int dp = round_up(d, 8), n_pad = round_up(N, kTile);
    const HeadStrides hs{n_pad, n_pad + 16, dp};
    return {hs, whole_lines(size_t(B) * Hkv * hs.transposed_head()),
            whole_lines(size_t(B) * Hkv * hs.rows_head()),
            whole_lines(size_t(kTile) * (2 * dp + kTile + 2))};
  }
  size_t floats(int threads) const { return kt + v + size_t(threads) * per_thread; }
};

// The caller's scratch if it has one (checked to hold `needed` floats), else `own`, allocated.
float* use_scratch(std::vector<float>& own, float* scratch, size_t scratch_floats, size_t needed,
                   const char* op) {
  if (!scratch) {
    own.resize(needed);
    return own.data();
  }
  ULYSSES_ASSERT(scratch_floats >= needed, "{}: scratch of {} floats, needs {}", op, scratch_floats,
                 needed);
  return scratch;
}

void check_shapes(int B, int N, int Hq, int Hkv, int d) {
  ULYSSES_ASSERT(B > 0 && N > 0 && Hq > 0 && Hkv > 0 && d > 0,
                 "attention: bad shape B={} N={} Hq={} Hkv={} d={}", B, N, Hq, Hkv, d);
  ULYSSES_ASSERT(Hq % Hkv == 0, "attention: Hq={} is not a multiple of Hkv={}", Hq, Hkv);
}

}  // namespace

size_t attention_forward_scratch_floats(int B, int N, int Hq, int Hkv, int d, int threads) {
  check_shapes(B, N, Hq, Hkv, d);
  return ForwardScratch::of(B, N, Hkv, d).floats(threads);
}

void attention_forward(float* out, float* lse, const float* qkv, int B, int N, int Hq, int Hkv,
                       int d, float* scratch, size_t scratch_floats) {
  check_shapes(B, N, Hq, Hkv, d);
  const Packed in{N, Hq + 2 * Hkv, d};
  const Packed o{N, Hq, d};
  const int group = Hq / Hkv;
  const int dp = round_up(d, 8);
  const float scale = 1.0f / std::sqrt(float(d));
  const int n_tiles = (N + kTile - 1) / kTile;
  const int64_t n_tasks = int64_t(B) * Hq * n_tiles;

  // K^T and V of every kv head (each about as large as K itself), then the threads' areas
  const ForwardScratch fs = ForwardScratch::of(B, N, Hkv, d);
  const HeadStrides& hs = fs.hs;
  std::vector<float> own;
  scratch = use_scratch(own, scratch, scratch_floats, fs.floats(omp_get_max_threads()), "attention_forward");
  float* const KT = scratch;
  float* const Vr = KT + fs.kt;

#pragma omp parallel
  {
    rearrange_heads(KT, true, hs, qkv, in, B, Hq, Hkv);
    rearrange_heads(Vr, false, hs, qkv, in, B, Hq + Hkv, Hkv);
#pragma omp barrier
    float* Q = Vr + fs.v + omp_get_thread_num() * fs.per_thread;  // [kTile, dp] scaled by 1/sqrt(d)
    float* acc = Q + kTile * dp;     // [kTile, dp]   unnormalised output
    float* S = acc + kTile * dp;     // [kTile, kTile] scores, then probabilities
    float* m = S + kTile * kTile;    // [kTile] running max
    float* l = m + kTile;            // [kTile] running sum

    // The longest query tiles (most key tiles) are handed out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; task++) {
      const int qt = n_tiles - 1 - int(task % n_tiles);
      const int h = int((task / n_tiles) % Hq);
      const int b = int(task / (int64_t(n_tiles) * Hq));
      const int kvh = h / group;
      const int i0 = qt * kTile, iq = std::min(kTile, N - i0), iq4 = round_up(iq, 4);
      const float* KT_h = KT + (int64_t(b) * Hkv + kvh) * hs.transposed_head();
      const float* V_h = Vr + (int64_t(b) * Hkv + kvh) * hs.rows_head();

      load_rows(Q, dp, qkv, in, b, i0, h, iq, iq4, scale);
      std::fill(acc, acc + iq4 * dp, 0.0f);
      std::fill(m, m + iq, kNegInf);
      std::fill(l, l + iq, 0.0f);

      for (int kt = 0; kt <= qt; kt++) {
        const int j0 = kt * kTile, jk = std::min(kTile, N - j0), jk8 = round_up(jk, 8);
        const bool diagonal = kt == qt;  // equal tiles: key j visible to query i iff j <= i
        tile_gemm<false>(S, kTile, Q, dp, KT_h + j0, hs.ld_t, iq4, jk8, d);  // S = Q K^T / sqrt(d)

        // online softmax: rescale the row's running state to the new max, add this tile
        for (int i = 0; i < iq; i++) {
          const int jn = diagonal ? std::min(jk, i + 1) : jk;  // visible keys of this row
          float* s = S + i * kTile;
          const float m_new = std::max(m[i], max_of(s, jn));  // jn >= 1: key j0 <= i0 + i
          const float correction = m[i] == kNegInf ? 0.0f : std::exp(m[i] - m_new);
          for (int j = 0; j < jn; j++) s[j] = exp_approx(s[j] - m_new);
          std::fill(s + jn, s + jk, 0.0f);  // masked
          l[i] = l[i] * correction + float(sum_of(s, jn));
          m[i] = m_new;
          if (correction != 1.0f)
            for (int c = 0; c < dp; c++) acc[i * dp + c] *= correction;
        }
        // the padding rows [iq, iq4) of S are zero (zero queries) and add nothing
        tile_gemm<true>(acc, dp, S, kTile, V_h + int64_t(j0) * dp, dp, iq4, dp, jk);  // acc += P V
      }

      for (int i = 0; i < iq; i++) {
        float* y = out + o.offset(b, i0 + i, h);
        const float inv = 1.0f / l[i];
        for (int c = 0; c < d; c++) y[c] = acc[i * dp + c] * inv;
        lse[(int64_t(b) * Hq + h) * N + i0 + i] = m[i] + std::log(l[i]);
      }
    }
  }
}

namespace {

// The backward pass's shapes and inputs.
struct Backward {
  const float* dout;  // [B, N, Hq, d]
  const float* qkv;   // [B, N, Hq + 2 Hkv, d]
  const float* out;   // [B, N, Hq, d]
  const float* lse;   // [B, Hq, N]
  float* D;           // [B, Hq, N] rowsum(dO * O)        (made by prepare_backward)
  float* KT;          // [B, Hkv, d, ld_t] K^T            (rearrange_heads)
  float* VT;          // [B, Hkv, d, ld_t] V^T
  float* Kr;          // [B, Hkv, n_pad, dp] K
  float* dqkv;        // [B, N, Hq + 2 Hkv, d]
  float* areas;       // one area of per_thread floats per thread (thread_area)
  size_t per_thread;
  Packed in, o;
  HeadStrides hs;
  int N, Hq, Hkv, d, dp, group, n_tiles, n_pad;
  float scale;
};

// Per-thread tiles of one pair at the start of the thread's scratch area: P and dS (dP first),
// [kTile, kTile] each.
struct Tiles {
  static constexpr size_t kTileFloats = size_t(2) * kTile * kTile;
  float *P, *dS;
  explicit Tiles(float* area) : P(area), dS(area + kTile * kTile) {}
};

int tile_rows(const Backward& w, int tile) { return std::min(kTile, w.N - tile * kTile); }

// The calling thread's area: the pair tiles (Tiles::kTileFloats), then the schedule's buffers.
float* thread_area(const Backward& w) { return w.areas + omp_get_thread_num() * w.per_thread; }

// The fused schedule does 5 tile products per tile pair, the split one 7: fused unless its
// B * Hkv equal tasks would keep fewer than 3/4 of the threads busy, or its whole-sequence
// buffers (5 · n_pad · dp floats per thread) would pass kFusedBytesPerThread, which bounds the
// memory at long N (the split schedule's buffers are tiles). Both give the same bits, so the
// choice (which depends on the thread count and N) does not change the result.
bool fused_schedule(int B, int Hkv, int n_pad, int dp, int threads) {
  constexpr size_t kFusedBytesPerThread = size_t(64) << 20;  // N up to about 52K at d = 64
  const bool fits = 5 * size_t(n_pad) * size_t(dp) * sizeof(float) <= kFusedBytesPerThread;
  const int64_t tasks = int64_t(B) * Hkv;
  const int64_t rounds = (tasks + threads - 1) / threads;
  return fits && 4 * tasks >= 3 * rounds * threads;
}

// The backward's scratch: D [B, Hq, N], K^T and V^T [B, Hkv, dp, ld_t], K [B, Hkv, n_pad, dp],
// then one area per thread: the pair tiles and 5 buffers (Q, dO, dQ, dK, dV) of n_pad · dp
// floats (fused) or kTile · dp (split).
struct BackwardScratch {
  HeadStrides hs;
  bool fused;
  size_t D, kt, kr, per_thread;  // floats; K^T and V^T kt each
  static BackwardScratch of(int B, int N, int Hq, int Hkv, int d, int threads) {
    const int dp = round_up(d, 8), n_pad = round_up(N, kTile);
    const HeadStrides hs{n_pad, n_pad + 16, dp};
    const bool fused = fused_schedule(B, Hkv, n_pad, dp, threads);
    const size_t buffer = size_t(fused ? n_pad : kTile) * dp;
    return {hs, fused, whole_lines(size_t(B) * Hq * N), whole_lines(size_t(B) * Hkv * hs.transposed_head()),
            whole_lines(size_t(B) * Hkv * hs.rows_head()), whole_lines(Tiles::kTileFloats + 5 * buffer)};
  }
  size_t floats(int threads) const { return D + 2 * kt + kr + size_t(threads) * per_thread; }
};

// D = rowsum(dO * O) and the rearranged keys and values; called by every thread of the
// schedule's parallel region, so that one region does the whole backward.
void prepare_backward(const Backward& w, int B) {
#pragma omp for schedule(static) nowait
  for (int64_t bh = 0; bh < int64_t(B) * w.Hq; bh++) {
    const int b = int(bh / w.Hq), h = int(bh % w.Hq);
    for (int t = 0; t < w.N; t++) {
      const float* go = w.dout + w.o.offset(b, t, h);
      const float* y = w.out + w.o.offset(b, t, h);
      float s = 0.0f;
      for (int c = 0; c < w.d; c++) s += go[c] * y[c];
      w.D[size_t(bh) * w.N + t] = s;
    }
  }
  rearrange_heads(w.KT, true, w.hs, w.qkv, w.in, B, w.Hq, w.Hkv);
  rearrange_heads(w.VT, true, w.hs, w.qkv, w.in, B, w.Hq + w.Hkv, w.Hkv);
  rearrange_heads(w.Kr, false, w.hs, w.qkv, w.in, B, w.Hq, w.Hkv);
#pragma omp barrier
}

// One (query tile, key tile) pair's operands: Q (scaled by 1/sqrt(d)) and dO rows of the query
// tile [iq4, dp] (zero rows past N), K rows [kTile, dp], K^T and V^T [d, ld_t] from the key
// tile's first column on.
struct PairOperands {
  const float *Q, *dO, *K, *KT, *VT;
};

PairOperands key_operands(const Backward& w, int b, int kvh, int kt) {
  PairOperands op{};
  const int64_t head = int64_t(b) * w.Hkv + kvh;
  op.KT = w.KT + head * w.hs.transposed_head() + kt * kTile;
  op.VT = w.VT + head * w.hs.transposed_head() + kt * kTile;
  op.K = w.Kr + head * w.hs.rows_head() + int64_t(kt) * kTile * w.dp;
  return op;
}

// Q (scaled) and dO [n_pad, dp] of query head h, zero-padded.
void load_query_head(float* Q, float* dO, const Backward& w, int b, int h) {
  load_rows(Q, w.dp, w.qkv, w.in, b, 0, h, w.N, w.n_pad, w.scale);
  load_rows(dO, w.dp, w.dout, w.o, b, 0, h, w.N, w.n_pad, 1.0f);
}

// P = exp(S - lse) and dS = P * (dO V^T - D) [iq4, jk8] for query tile qt (head h) against key
// tile kt; masked and padding entries are 0 (the padding rows [iq, iq4) too: zero Q and dO rows).
void probs_and_dscores(Tiles& t, const PairOperands& op, const Backward& w, int b, int h, int qt,
                       int kt) {
  const int i0 = qt * kTile, iq = tile_rows(w, qt), iq4 = round_up(iq, 4);
  const int jk = tile_rows(w, kt), jk8 = round_up(jk, 8);
  const bool diagonal = qt == kt;
  const float* lse_h = w.lse + (int64_t(b) * w.Hq + h) * w.N;
  const float* D_h = w.D + (int64_t(b) * w.Hq + h) * w.N;
  tile_gemm<false>(t.P, kTile, op.Q, w.dp, op.KT, w.hs.ld_t, iq4, jk8, w.d);    // S
  tile_gemm<false>(t.dS, kTile, op.dO, w.dp, op.VT, w.hs.ld_t, iq4, jk8, w.d);  // dP = dO V^T
  for (int i = 0; i < iq; i++) {
    const int jn = diagonal ? std::min(jk, i + 1) : jk;
    float* p = t.P + i * kTile;
    float* ds = t.dS + i * kTile;
    const float lse_i = lse_h[i0 + i], D_i = D_h[i0 + i];
    for (int j = 0; j < jn; j++) p[j] = exp_approx(p[j] - lse_i);
    std::fill(p + jn, p + jk8, 0.0f);
    for (int j = 0; j < jk8; j++) ds[j] = p[j] * (ds[j] - D_i);
  }
}

// dV += P^T dO, dK += dS^T Q (Q scaled) for the key tile ([jk4, dp] accumulators).
void add_dk_dv(float* dK, float* dV, const Tiles& t, const PairOperands& op, const Backward& w,
               int qt, int kt) {
  const int iq = tile_rows(w, qt), jk4 = round_up(tile_rows(w, kt), 4);
  tile_gemm<true, true>(dV, w.dp, t.P, kTile, op.dO, w.dp, jk4, w.dp, iq);
  tile_gemm<true, true>(dK, w.dp, t.dS, kTile, op.Q, w.dp, jk4, w.dp, iq);
}

// dQ [iq4, dp] += dS K for the query tile. Both schedules call it for kt = 0, 1, ..., qt in this
// order on a zeroed accumulator and scale by 1/sqrt(d) once at the end (store_dq), so dq is the
// same sum in the same order.
void add_dq(float* dQ, const Tiles& t, const PairOperands& op, const Backward& w, int qt, int kt) {
  tile_gemm<true>(dQ, w.dp, t.dS, kTile, op.K, w.dp, round_up(tile_rows(w, qt), 4), w.dp,
                  tile_rows(w, kt));
}

void store_dq(const float* dQ, const Backward& w, int b, int h, int qt) {
  for (int i = 0; i < tile_rows(w, qt); i++) {
    float* dq = w.dqkv + w.in.offset(b, qt * kTile + i, h);
    for (int c = 0; c < w.d; c++) dq[c] = dQ[i * w.dp + c] * w.scale;
  }
}

void store_dk_dv(const float* dK, const float* dV, const Backward& w, int b, int kvh, int kt) {
  for (int j = 0; j < tile_rows(w, kt); j++) {
    const int row = kt * kTile + j;
    std::copy(dK + j * w.dp, dK + j * w.dp + w.d, w.dqkv + w.in.offset(b, row, w.Hq + kvh));
    std::copy(dV + j * w.dp, dV + j * w.dp + w.d, w.dqkv + w.in.offset(b, row, w.Hq + w.Hkv + kvh));
  }
}

// Fused: one task per (batch, kv head). For each query head of the group it loads that head's Q
// and dO whole ([n_pad, dp], once instead of once per tile pair) and walks every key tile and
// every query tile on or below the diagonal, accumulating dK, dV (whole-sequence buffers, the
// same sums in the same order as the tile buffers of the split schedule: query head outer,
// query tile inner) and dQ together (5 tile products). Per thread 5 · n_pad · dp floats.
void backward_fused(const Backward& w, int B) {
  const size_t whole = size_t(w.n_pad) * w.dp;
#pragma omp parallel
  {
    prepare_backward(w, B);
    float* area = thread_area(w);
    Tiles t(area);
    float *Q = area + Tiles::kTileFloats, *dO = Q + whole, *dQ = dO + whole, *dK = dQ + whole,
          *dV = dK + whole;
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < B * w.Hkv; task++) {
      const int b = task / w.Hkv, kvh = task % w.Hkv;
      std::fill(dK, dK + whole, 0.0f);
      std::fill(dV, dV + whole, 0.0f);
      for (int g = 0; g < w.group; g++) {
        const int h = kvh * w.group + g;
        load_query_head(Q, dO, w, b, h);
        std::fill(dQ, dQ + whole, 0.0f);
        for (int kt = 0; kt < w.n_tiles; kt++) {
          PairOperands op = key_operands(w, b, kvh, kt);
          float* dK_j = dK + size_t(kt) * kTile * w.dp;
          float* dV_j = dV + size_t(kt) * kTile * w.dp;
          for (int qt = kt; qt < w.n_tiles; qt++) {
            op.Q = Q + size_t(qt) * kTile * w.dp;
            op.dO = dO + size_t(qt) * kTile * w.dp;
            probs_and_dscores(t, op, w, b, h, qt, kt);
            add_dk_dv(dK_j, dV_j, t, op, w, qt, kt);
            add_dq(dQ + size_t(qt) * kTile * w.dp, t, op, w, qt, kt);
          }
        }
        for (int qt = 0; qt < w.n_tiles; qt++) store_dq(dQ + size_t(qt) * kTile * w.dp, w, b, h, qt);
      }
      for (int kt = 0; kt < w.n_tiles; kt++)
        store_dk_dv(dK + size_t(kt) * kTile * w.dp, dV + size_t(kt) * kTile * w.dp, w, b, kvh, kt);
    }
  }
}

// Split, for when B * Hkv tasks would leave threads idle (long sequences at B = 1, MQA):
//   pass 1, one task per (batch, kv head, key tile): dK, dV of the tile (4 tile products);
//   pass 2, one task per (batch, query head, query tile): dq of the tile, recomputing P and dS
//   (3 tile products). Both hand out the longest tasks first. Every output row is written by one
//   task, with the same arithmetic in the same order as the fused schedule.
void backward_split(const Backward& w, int B) {
  const int nt = w.n_tiles;
  const size_t tile = size_t(kTile) * w.dp;
#pragma omp parallel
  {
    prepare_backward(w, B);
    float* area = thread_area(w);
    Tiles t(area);
    float *Q = area + Tiles::kTileFloats, *dO = Q + tile, *dQ = dO + tile, *dK = dQ + tile,
          *dV = dK + tile;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < int64_t(B) * w.Hkv * nt; task++) {
      const int kt = int(task % nt);  // the longest (kt = 0) first
      const int kvh = int((task / nt) % w.Hkv), b = int(task / (int64_t(nt) * w.Hkv));
      PairOperands op = key_operands(w, b, kvh, kt);
      op.Q = Q;
      op.dO = dO;
      std::fill(dK, dK + tile, 0.0f);
      std::fill(dV, dV + tile, 0.0f);
      for (int g = 0; g < w.group; g++)
        for (int qt = kt; qt < nt; qt++) {
          const int h = kvh * w.group + g;
          const int iq = tile_rows(w, qt), iq4 = round_up(iq, 4);
          load_rows(Q, w.dp, w.qkv, w.in, b, qt * kTile, h, iq, iq4, w.scale);
          load_rows(dO, w.dp, w.dout, w.o, b, qt * kTile, h, iq, iq4, 1.0f);
          probs_and_dscores(t, op, w, b, h, qt, kt);
          add_dk_dv(dK, dV, t, op, w, qt, kt);
        }
      store_dk_dv(dK, dV, w, b, kvh, kt);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < int64_t(B) * w.Hq * nt; task++) {
      const int qt = nt - 1 - int(task % nt);  // the longest (qt = nt - 1) first
      const int h = int((task / nt) % w.Hq), b = int(task / (int64_t(nt) * w.Hq));
      const int iq = tile_rows(w, qt), iq4 = round_up(iq, 4);
      load_rows(Q, w.dp, w.qkv, w.in, b, qt * kTile, h, iq, iq4, w.scale);
      load_rows(dO, w.dp, w.dout, w.o, b, qt * kTile, h, iq, iq4, 1.0f);
      std::fill(dQ, dQ + tile, 0.0f);
      for (int kt = 0; kt <= qt; kt++) {
        PairOperands op = key_operands(w, b, h / w.group, kt);
        op.Q = Q;
        op.dO = dO;
        probs_and_dscores(t, op, w, b, h, qt, kt);
        add_dq(dQ, t, op, w, qt, kt);
      }
      store_dq(dQ, w, b, h, qt);
    }
  }
}

}  // namespace

size_t attention_backward_scratch_floats(int B, int N, int Hq, int Hkv, int d, int threads) {
  check_shapes(B, N, Hq, Hkv, d);
  return BackwardScratch::of(B, N, Hq, Hkv, d, threads).floats(threads);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int N, int Hq, int Hkv, int d, float* scratch,
                        size_t scratch_floats) {
  check_shapes(B, N, Hq, Hkv, d);
  const Packed in{N, Hq + 2 * Hkv, d};
  const Packed o{N, Hq, d};
  const int n_tiles = (N + kTile - 1) / kTile;

  // D (B·Hq·N floats, 0.2 MB at N = 4096 with 12 heads), K^T, V^T and K (each about as large as
  // K), filled by prepare_backward inside the schedule's parallel region, then the threads' areas
  const int threads = omp_get_max_threads();
  const BackwardScratch bs = BackwardScratch::of(B, N, Hq, Hkv, d, threads);
  std::vector<float> own;
  scratch = use_scratch(own, scratch, scratch_floats, bs.floats(threads), "attention_backward");
  float* const D = scratch;
  float* const KT = D + bs.D;
  float* const VT = KT + bs.kt;
  float* const Kr = VT + bs.kt;
  float* const areas = Kr + bs.kr;

  const Backward w{dout, qkv, out, lse, D, KT, VT, Kr, dqkv, areas, bs.per_thread, in, o, bs.hs,
                   N, Hq, Hkv, d, bs.hs.dp, Hq / Hkv, n_tiles, bs.hs.n_pad, 1.0f / std::sqrt(float(d))};
  if (bs.fused)
    backward_fused(w, B);
  else
    backward_split(w, B);
}

}  // namespace ulysses::cpu
