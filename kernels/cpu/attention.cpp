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
// The tile products are plain loops shaped as axpy's over contiguous rows (K and V are also
// stored transposed in the tile), which the compiler vectorises without reassociating sums.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

namespace {

constexpr int kTile = 64;  // rows per query tile and per key tile (equal: see `diagonal`)

// y[0:n] += a * x[0:n]
inline void axpy(float* __restrict y, const float* __restrict x, float a, int n) {
  for (int j = 0; j < n; j++) y[j] += a * x[j];
}

// Where row t of head `head` of batch b lives in the packed [B, N, H3, d] buffer.
struct Packed {
  int N, H3, d;
  int64_t offset(int b, int t, int head) const {
    return ((int64_t(b) * N + t) * H3 + head) * d;
  }
};

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
  const float scale = 1.0f / std::sqrt(float(d));
  const int n_tiles = (N + kTile - 1) / kTile;
  const int64_t n_tasks = int64_t(B) * Hq * n_tiles;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#pragma omp parallel
  {
    std::vector<float> work(size_t(kTile) * (4 * d + kTile + 2));
    float* Q = work.data();          // [kTile, d]   scaled by 1/sqrt(d)
    float* Kt = Q + kTile * d;       // [d, kTile]   the key tile, transposed
    float* V = Kt + kTile * d;       // [kTile, d]
    float* acc = V + kTile * d;      // [kTile, d]   unnormalised output
    float* S = acc + kTile * d;      // [kTile, kTile] scores, then probabilities
    float* m = S + kTile * kTile;    // [kTile] running max
    float* l = m + kTile;            // [kTile] running sum

    // The longest query tiles (most key tiles) are handed out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; task++) {
      const int qt = n_tiles - 1 - int(task % n_tiles);
      const int h = int((task / n_tiles) % Hq);
      const int b = int(task / (int64_t(n_tiles) * Hq));
      const int kvh = h / group;
      const int i0 = qt * kTile, iq = std::min(kTile, N - i0);

      for (int i = 0; i < iq; i++) {
        const float* q = qkv + in.offset(b, i0 + i, h);
        for (int c = 0; c < d; c++) Q[i * d + c] = q[c] * scale;
        m[i] = kNegInf;
        l[i] = 0.0f;
      }
      std::fill(acc, acc + iq * d, 0.0f);

      for (int kt = 0; kt <= qt; kt++) {
        const int j0 = kt * kTile, jk = std::min(kTile, N - j0);
        const bool diagonal = kt == qt;  // equal tiles: key j visible to query i iff j <= i
        for (int j = 0; j < jk; j++) {
          const float* k = qkv + in.offset(b, j0 + j, Hq + kvh);
          const float* v = qkv + in.offset(b, j0 + j, Hq + Hkv + kvh);
          for (int c = 0; c < d; c++) Kt[c * kTile + j] = k[c];
          std::copy(v, v + d, V + j * d);
        }
        for (int i = 0; i < iq; i++) {
          const int jn = diagonal ? std::min(jk, i + 1) : jk;  // visible keys of this row
          float* s = S + i * kTile;
          std::fill(s, s + jn, 0.0f);
          for (int c = 0; c < d; c++) axpy(s, Kt + c * kTile, Q[i * d + c], jn);
          // online softmax update
          float row_max = kNegInf;
          for (int j = 0; j < jn; j++) row_max = std::max(row_max, s[j]);
          const float m_new = std::max(m[i], row_max);
          if (m_new == kNegInf) continue;  // nothing visible yet (cannot happen when causal)
          const float correction = std::exp(m[i] - m_new);
          float sum = 0.0f;
          for (int j = 0; j < jn; j++) {
            s[j] = std::exp(s[j] - m_new);
            sum += s[j];
          }
          l[i] = l[i] * correction + sum;
          m[i] = m_new;
          float* a = acc + i * d;
          if (correction != 1.0f)
            for (int c = 0; c < d; c++) a[c] *= correction;
          for (int j = 0; j < jn; j++) axpy(a, V + j * d, s[j], d);
        }
      }

      for (int i = 0; i < iq; i++) {
        float* y = out + o.offset(b, i0 + i, h);
        const float inv = 1.0f / l[i];
        for (int c = 0; c < d; c++) y[c] = acc[i * d + c] * inv;
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
  const float scale = 1.0f / std::sqrt(float(d));
  const int n_tiles = (N + kTile - 1) / kTile;
  const int n_tasks = B * Hkv;

#pragma omp parallel
  {
    std::vector<float> work(size_t(kTile) * (7 * d + 2 * kTile) + size_t(group) * N);
    float* K = work.data();          // [kTile, d]
    float* Kt = K + kTile * d;       // [d, kTile]
    float* Vt = Kt + kTile * d;      // [d, kTile]
    float* dK = Vt + kTile * d;      // [kTile, d]
    float* dV = dK + kTile * d;      // [kTile, d]
    float* Q = dV + kTile * d;       // [kTile, d]  scaled by 1/sqrt(d)
    float* dO = Q + kTile * d;       // [kTile, d]
    float* P = dO + kTile * d;       // [kTile, kTile]
    float* dS = P + kTile * kTile;   // [kTile, kTile] dP, then dS
    float* D = dS + kTile * kTile;   // [group, N] rowsum(dO * O) of each query head

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
        for (int j = 0; j < jk; j++) {
          const float* k = qkv + in.offset(b, j0 + j, Hq + kvh);
          const float* v = qkv + in.offset(b, j0 + j, Hq + Hkv + kvh);
          std::copy(k, k + d, K + j * d);
          for (int c = 0; c < d; c++) {
            Kt[c * kTile + j] = k[c];
            Vt[c * kTile + j] = v[c];
          }
        }
        std::fill(dK, dK + jk * d, 0.0f);
        std::fill(dV, dV + jk * d, 0.0f);

        for (int g = 0; g < group; g++) {
          const int h = h_first + g;
          const float* lse_h = lse + (int64_t(b) * Hq + h) * N;
          const float* D_h = D + int64_t(g) * N;
          for (int qt = kt; qt < n_tiles; qt++) {
            const int i0 = qt * kTile, iq = std::min(kTile, N - i0);
            const bool diagonal = qt == kt;
            for (int i = 0; i < iq; i++) {
              const float* q = qkv + in.offset(b, i0 + i, h);
              for (int c = 0; c < d; c++) Q[i * d + c] = q[c] * scale;
              const float* go = dout + o.offset(b, i0 + i, h);
              std::copy(go, go + d, dO + i * d);
            }
            for (int i = 0; i < iq; i++) {
              const int jn = diagonal ? std::min(jk, i + 1) : jk;
              float* p = P + i * kTile;
              float* ds = dS + i * kTile;
              // P = exp(S - lse) and dP = dO V^T, row i
              std::fill(p, p + jn, 0.0f);
              std::fill(ds, ds + jn, 0.0f);
              for (int c = 0; c < d; c++) {
                axpy(p, Kt + c * kTile, Q[i * d + c], jn);
                axpy(ds, Vt + c * kTile, dO[i * d + c], jn);
              }
              const float lse_i = lse_h[i0 + i], D_i = D_h[i0 + i];
              for (int j = 0; j < jn; j++) {
                p[j] = std::exp(p[j] - lse_i);
                ds[j] = p[j] * (ds[j] - D_i);
              }
              // dV += P^T dO;  dK += dS^T Q (Q already scaled);  dQ += dS K / sqrt(d)
              float* dq = dqkv + in.offset(b, i0 + i, h);
              for (int j = 0; j < jn; j++) {
                axpy(dV + j * d, dO + i * d, p[j], d);
                axpy(dK + j * d, Q + i * d, ds[j], d);
                axpy(dq, K + j * d, ds[j] * scale, d);
              }
            }
          }
        }

        for (int j = 0; j < jk; j++) {
          std::copy(dK + j * d, dK + (j + 1) * d, dqkv + in.offset(b, j0 + j, Hq + kvh));
          std::copy(dV + j * d, dV + (j + 1) * d, dqkv + in.offset(b, j0 + j, Hq + Hkv + kvh));
        }
      }
    }
  }
}

}  // namespace ulysses::cpu
