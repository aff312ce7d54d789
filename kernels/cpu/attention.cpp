// Causal multi-head attention with GQA, flash-style, fp32 CPU reference.
//
// qkv: [B, N, Hq + 2*Hkv, d] packed; query head h uses key/value head h / (Hq/Hkv).
// out: [B, N, Hq, d]; lse: [B, Hq, N] = log sum_j exp(s_ij), s_ij = q_i·k_j / sqrt(d), j <= i.
//
// Forward, per (batch, query head, query tile of kTile rows): walk the key tiles left of and on
// the diagonal, keep a running row max m and sum l (online softmax) and an unnormalised output
// accumulator; key tiles above the diagonal are never touched, the diagonal tile is masked
// inside. Nothing of size N×N is ever allocated: the work buffers are O(kTile·d) per thread.
//
// Backward, per (batch, kv head): for each key tile, for every query head of the group and every
// query tile on or below the diagonal, recompute P = exp(S - lse) and
//   dV_j += P^T dO_i;  dP = dO_i V_j^T;  dS = P * (dP - D_i)   with D_i = rowsum(dO_i * O_i)
//   dQ_i += dS K_j / sqrt(d);  dK_j += dS^T Q_i / sqrt(d).
// A task owns every row of dq, dk, dv it writes (its batch and kv-head group), so there are no
// races and the result does not depend on the thread count or schedule.
//
// Stages: load a tile into a local buffer (zero-padded to the micro-kernel's 4×8 blocking, head
// dimension padded to dp = round_up(d, 8)), multiply tiles with tile_gemm (a register-blocked
// loop nest the compiler vectorises), and the softmax step on rows with the vectorisable exp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/vec_math.h"

namespace ulysses::cpu {

namespace {

constexpr int kTile = 64;  // rows per query tile and per key tile (equal: see `diagonal`)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Four floats in one SSE register (GCC/Clang vector extension): the micro-kernel below is
// written with it so that its 4×8 accumulator block stays in eight registers whatever the loop
// bounds (written as plain loops, GCC vectorised the k loop instead, with spills).
typedef float f32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof v); }

// C[M, N] (+)= A[M, K] · B[K, N], row-major with leading dimensions; M % 4 == 0, N % 8 == 0.
template <bool kAccumulate>
void tile_gemm(float* __restrict C, int ldc, const float* __restrict A, int lda,
               const float* __restrict B, int ldb, int M, int N, int K) {
  for (int i = 0; i < M; i += 4)
    for (int j = 0; j < N; j += 8) {
      f32x4 acc[4][2];
      for (int r = 0; r < 4; r++) {
        acc[r][0] = kAccumulate ? load4(C + (i + r) * ldc + j) : f32x4{};
        acc[r][1] = kAccumulate ? load4(C + (i + r) * ldc + j + 4) : f32x4{};
      }
      const float* a = A + i * lda;
      for (int k = 0; k < K; k++) {
        const f32x4 b0 = load4(B + k * ldb + j), b1 = load4(B + k * ldb + j + 4);
        for (int r = 0; r < 4; r++) {
          const float ar = a[r * lda + k];
          acc[r][0] += ar * b0;
          acc[r][1] += ar * b1;
        }
      }
      for (int r = 0; r < 4; r++) {
        store4(C + (i + r) * ldc + j, acc[r][0]);
        store4(C + (i + r) * ldc + j + 4, acc[r][1]);
      }
    }
}

// dst[j, i] = src[i, j] for i < rows, j < cols (both with row stride kTile).
void transpose_tile(float* __restrict dst, const float* __restrict src, int rows, int cols) {
  for (int j = 0; j < cols; j++)
    for (int i = 0; i < rows; i++) dst[j * kTile + i] = src[i * kTile + j];
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

// dst[c, r] = src(row0 + r)[c] for c < d (row stride kTile); columns [rows, rows_padded) zero.
void load_transposed(float* dst, const float* base, const Packed& p, int b, int row0, int head,
                     int rows, int rows_padded) {
  for (int r = 0; r < rows; r++) {
    const float* src = base + p.offset(b, row0 + r, head);
    for (int c = 0; c < p.d; c++) dst[c * kTile + r] = src[c];
  }
  for (int c = 0; c < p.d; c++) std::fill(dst + c * kTile + rows, dst + c * kTile + rows_padded, 0.0f);
}

void check_shapes(int B, int N, int Hq, int Hkv, int d) {
  ULYSSES_ASSERT(B > 0 && N > 0 && Hq > 0 && Hkv > 0 && d > 0,
                 "attention: bad shape B={} N={} Hq={} Hkv={} d={}", B, N, Hq, Hkv, d);
  ULYSSES_ASSERT(Hq % Hkv == 0, "attention: Hq={} is not a multiple of Hkv={}", Hq, Hkv);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int N, int Hq, int Hkv,
                       int d) {
  check_shapes(B, N, Hq, Hkv, d);
  const Packed in{N, Hq + 2 * Hkv, d};
  const Packed o{N, Hq, d};
  const int group = Hq / Hkv;
  const int dp = round_up(d, 8);
  const float scale = 1.0f / std::sqrt(float(d));
  const int n_tiles = (N + kTile - 1) / kTile;
  const int64_t n_tasks = int64_t(B) * Hq * n_tiles;

#pragma omp parallel
  {
    std::vector<float> work(size_t(kTile) * (3 * dp + d + kTile + 2));
    float* Q = work.data();          // [kTile, dp]   scaled by 1/sqrt(d)
    float* V = Q + kTile * dp;       // [kTile, dp]
    float* acc = V + kTile * dp;     // [kTile, dp]   unnormalised output
    float* Kt = acc + kTile * dp;    // [d, kTile]    the key tile, transposed
    float* S = Kt + kTile * d;       // [kTile, kTile] scores, then probabilities
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

      load_rows(Q, dp, qkv, in, b, i0, h, iq, iq4, scale);
      std::fill(acc, acc + iq4 * dp, 0.0f);
      std::fill(m, m + iq, kNegInf);
      std::fill(l, l + iq, 0.0f);

      for (int kt = 0; kt <= qt; kt++) {
        const int j0 = kt * kTile, jk = std::min(kTile, N - j0), jk8 = round_up(jk, 8);
        const bool diagonal = kt == qt;  // equal tiles: key j visible to query i iff j <= i
        load_transposed(Kt, qkv, in, b, j0, Hq + kvh, jk, jk8);
        load_rows(V, dp, qkv, in, b, j0, Hq + Hkv + kvh, jk, jk, 1.0f);
        tile_gemm<false>(S, kTile, Q, dp, Kt, kTile, iq4, jk8, d);  // S = Q K^T / sqrt(d)

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
        tile_gemm<true>(acc, dp, S, kTile, V, dp, iq4, dp, jk);  // acc += P V
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

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int N, int Hq, int Hkv, int d) {
  check_shapes(B, N, Hq, Hkv, d);
  const Packed in{N, Hq + 2 * Hkv, d};
  const Packed o{N, Hq, d};
  const int group = Hq / Hkv;
  const int dp = round_up(d, 8);
  const float scale = 1.0f / std::sqrt(float(d));
  const int n_tiles = (N + kTile - 1) / kTile;
  const int n_tasks = B * Hkv;

#pragma omp parallel
  {
    std::vector<float> work(size_t(kTile) * (6 * dp + 2 * d + 3 * kTile) + size_t(group) * N);
    float* K = work.data();          // [kTile, dp]
    float* dK = K + kTile * dp;      // [kTile, dp]
    float* dV = dK + kTile * dp;     // [kTile, dp]
    float* Q = dV + kTile * dp;      // [kTile, dp]  scaled by 1/sqrt(d)
    float* dO = Q + kTile * dp;      // [kTile, dp]
    float* dQ = dO + kTile * dp;     // [kTile, dp]  this tile pair's dS K
    float* Kt = dQ + kTile * dp;     // [d, kTile]
    float* Vt = Kt + kTile * d;      // [d, kTile]
    float* P = Vt + kTile * d;       // [kTile, kTile]
    float* dS = P + kTile * kTile;   // [kTile, kTile] dP, then dS
    float* T = dS + kTile * kTile;   // [kTile, kTile] P^T, then dS^T
    float* D = T + kTile * kTile;    // [group, N] rowsum(dO * O) of each query head

#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < n_tasks; task++) {
      const int b = task / Hkv, kvh = task % Hkv;
      const int h_first = kvh * group;

      // dq of this group is accumulated below: zero it; compute D.
      for (int g = 0; g < group; g++)
        for (int t = 0; t < N; t++) {
          float* dq = dqkv + in.offset(b, t, h_first + g);
          std::fill(dq, dq + d, 0.0f);
          const float* go = dout + o.offset(b, t, h_first + g);
          const float* y = out + o.offset(b, t, h_first + g);
          float s = 0.0f;
          for (int c = 0; c < d; c++) s += go[c] * y[c];
          D[int64_t(g) * N + t] = s;
        }

      for (int kt = 0; kt < n_tiles; kt++) {
        const int j0 = kt * kTile, jk = std::min(kTile, N - j0);
        const int jk4 = round_up(jk, 4), jk8 = round_up(jk, 8);
        load_rows(K, dp, qkv, in, b, j0, Hq + kvh, jk, jk, 1.0f);
        load_transposed(Kt, qkv, in, b, j0, Hq + kvh, jk, jk8);
        load_transposed(Vt, qkv, in, b, j0, Hq + Hkv + kvh, jk, jk8);
        std::fill(dK, dK + jk4 * dp, 0.0f);
        std::fill(dV, dV + jk4 * dp, 0.0f);

        for (int g = 0; g < group; g++) {
          const int h = h_first + g;
          const float* lse_h = lse + (int64_t(b) * Hq + h) * N;
          const float* D_h = D + int64_t(g) * N;
          for (int qt = kt; qt < n_tiles; qt++) {
            const int i0 = qt * kTile, iq = std::min(kTile, N - i0), iq4 = round_up(iq, 4);
            const bool diagonal = qt == kt;
            load_rows(Q, dp, qkv, in, b, i0, h, iq, iq4, scale);
            load_rows(dO, dp, dout, o, b, i0, h, iq, iq4, 1.0f);
            tile_gemm<false>(P, kTile, Q, dp, Kt, kTile, iq4, jk8, d);    // S
            tile_gemm<false>(dS, kTile, dO, dp, Vt, kTile, iq4, jk8, d);  // dP = dO V^T
            for (int i = 0; i < iq; i++) {
              const int jn = diagonal ? std::min(jk, i + 1) : jk;
              float* p = P + i * kTile;
              float* ds = dS + i * kTile;
              const float lse_i = lse_h[i0 + i], D_i = D_h[i0 + i];
              for (int j = 0; j < jn; j++) p[j] = exp_approx(p[j] - lse_i);
              std::fill(p + jn, p + jk8, 0.0f);
              for (int j = 0; j < jk8; j++) ds[j] = p[j] * (ds[j] - D_i);
            }
            // the padding rows [iq, iq4) of P and dS are zero (zero Q and dO rows)
            transpose_tile(T, P, iq, jk4);
            tile_gemm<true>(dV, dp, T, kTile, dO, dp, jk4, dp, iq);   // dV += P^T dO
            transpose_tile(T, dS, iq, jk4);
            tile_gemm<true>(dK, dp, T, kTile, Q, dp, jk4, dp, iq);    // dK += dS^T Q (Q scaled)
            tile_gemm<false>(dQ, dp, dS, kTile, K, dp, iq4, dp, jk);  // dS K
            for (int i = 0; i < iq; i++) {
              float* dq = dqkv + in.offset(b, i0 + i, h);
              for (int c = 0; c < d; c++) dq[c] += dQ[i * dp + c] * scale;
            }
          }
        }

        for (int j = 0; j < jk; j++) {
          std::copy(dK + j * dp, dK + j * dp + d, dqkv + in.offset(b, j0 + j, Hq + kvh));
          std::copy(dV + j * dp, dV + j * dp + d, dqkv + in.offset(b, j0 + j, Hq + Hkv + kvh));
        }
      }
    }
  }
}

}  // namespace ulysses::cpu
