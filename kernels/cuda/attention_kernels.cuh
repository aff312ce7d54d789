// Causal flash attention, forward and backward, on tensor cores through the WMMA API
// (16x16x16 bf16 fragments, fp32 accumulators). Templated on the head dimension D; each
// attention_*_d<D>.cu instantiates one launcher so the build compiles them in parallel.
//
// Layout (cpu_ops.h): qkv [B, N, Hq + 2 Hkv, D]; q head h, k head Hq + g, v head Hq + Hkv + g,
// with g = h / (Hq / Hkv). out [B, N, Hq, D]; lse [B, Hq, N] (natural log); dout like out.
//
// Tiling: kTile = 64 query rows x 64 key columns per step, 4 warps per block; warp w owns the 16
// rows [16w, 16w + 16) of the block's tile (query rows in the forward and the dQ pass, key rows
// in the dK/dV pass). Tiles of q, k, v, dout live in shared memory, rows padded by 8 elements
// (16 bytes) against bank conflicts; rows past N are loaded as zeros and never written back.
//
// WMMA keeps the element -> (row, col) assignment of an accumulator fragment opaque. We learn
// it once per warp (load a matrix whose entries are their own row/col index into fragments
// `rows`/`cols`) and then work on accumulator elements directly: masking, exp, rescaling, and
// scattering bf16 values into shared memory for the next mma. Softmax row statistics in the
// forward are computed by lane pairs from an fp32 copy of the score tile in shared memory.
//
// Forward (per block: one 64-row query tile of one head; tiles scheduled heaviest first):
//   for each key tile j <= i: S = Q K^T -> smem; lanes 2r, 2r+1 own row r: running max m,
//   alpha = exp2(m_old - m_new), P = exp2(S*scale*log2e - m_new) -> smem (bf16), l = l*alpha + rowsum;
//   O = O*alpha + P V (fragments);  finally O /= l, lse = (m + log2 l) * ln 2.
// Backward, deterministic, no atomics (the D = rowsum(dO * O) preprocessing is in attention.cu):
//   pass 1, per key tile j of a kv head: for every query head of the group and query tile i >= j:
//     S^T = K Q^T, P^T = exp(S^T*scale - lse) (masked), dV += P^T dO, dP^T = V dO^T,
//     dS^T = P^T * (dP^T - D), dK += dS^T Q;  then dK *= scale.
//   pass 2, per query tile i of a query head: for every key tile j <= i:
//     S = Q K^T, P, dP = dO V^T, dS = P * (dP - D), dQ += dS K;  then dQ *= scale.
#pragma once
#include <mma.h>

#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda::attention {

using namespace nvcuda;

constexpr int kTile = 64;   // query rows and key columns per tile
constexpr int kWarps = 4;   // each warp owns 16 rows of a tile
constexpr int kThreads = kWarps * 32;
constexpr int kLdP = kTile + 8;  // bf16 row pitch of the 64x64 P / dS tiles
constexpr int kLdS = kTile + 4;  // fp32 row pitch of the forward's score tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

template <int D>
struct Dims {
  static_assert(D % 16 == 0, "head dimension must be a multiple of 16");
  static constexpr int kLd = D + 8;                                // bf16 row pitch of q/k/v/dout tiles
  static constexpr int kTileBytes = kTile * kLd * 2;               // one 64 x D bf16 tile
  static constexpr int kPBytes = kTile * kLdP * 2;                 // one 64 x 64 bf16 tile
  static constexpr int kSBytes = kTile * kLdS * 4;                 // one 64 x 64 fp32 tile
  static constexpr int kFrags = D / 16;                            // accumulator fragments per 16 x D
};

// Learns which (row, col) of the 16x16 tile each accumulator element holds. scratch: 256 floats
// (32-byte aligned) private to the warp.
__device__ inline void fragment_coords(Acc& rows, Acc& cols, float* scratch) {
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < 256; i += 32) scratch[i] = float(i / 16);
  __syncwarp();
  wmma::load_matrix_sync(rows, scratch, 16, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 256; i += 32) scratch[i] = float(i % 16);
  __syncwarp();
  wmma::load_matrix_sync(cols, scratch, 16, wmma::mem_row_major);
  __syncwarp();
}

// Copies rows [row0, row0 + 64) of one head into a 64 x D smem tile (pitch Dims<D>::kLd), with
// 16-byte vectors; rows >= N become zeros. g: the head's row 0; g_stride: elements between rows.
template <int D>
__device__ inline void load_tile(bf16* tile, const bf16* g, int64_t g_stride, int row0, int N) {
  constexpr int kVecs = D / 8;
  for (int idx = threadIdx.x; idx < kTile * kVecs; idx += blockDim.x) {
    const int r = idx / kVecs, c = (idx % kVecs) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < N) v = *reinterpret_cast<const uint4*>(g + int64_t(row0 + r) * g_stride + c);
    *reinterpret_cast<uint4*>(tile + r * Dims<D>::kLd + c) = v;
  }
}

// Loads a per-row fp32 vector (lse or D) of rows [row0, row0 + 64) into smem, times `scale`;
// rows >= N get 0.
__device__ inline void load_row_stats(float* dst, const float* src, int row0, int N, float scale) {
  for (int r = threadIdx.x; r < kTile; r += blockDim.x) dst[r] = row0 + r < N ? src[row0 + r] * scale : 0.0f;
}

// acc[n] (n < 4) = A (16 x K rows of `a`, pitch lda) · B^T where B is 64 x K (pitch ldb): the
// 16 x 64 product of a warp's rows with a tile's rows.
template <int K>
__device__ inline void mma_rows_by_tile_t(Acc (&acc)[4], const bf16* a, int lda, const bf16* b, int ldb) {
  for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.0f);
  for (int kk = 0; kk < K; kk += 16) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
    for (int n = 0; n < 4; ++n) {
      FragBCol fb;  // B^T's 16x16 block (kk, 16n) is B's rows 16n.., cols kk.. read column-major
      wmma::load_matrix_sync(fb, b + n * 16 * ldb + kk, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// acc[f] (f < D/16) += A (16 x 64, bf16 pitch kLdP) · B (64 x D tile, pitch ldb).
template <int D>
__device__ inline void mma_p_by_tile(Acc (&acc)[D / 16], const bf16* a, const bf16* b, int ldb) {
  for (int kk = 0; kk < kTile; kk += 16) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + kk, kLdP);
    for (int f = 0; f < D / 16; ++f) {
      FragBRow fb;
      wmma::load_matrix_sync(fb, b + kk * ldb + f * 16, ldb);
      wmma::mma_sync(acc[f], fa, fb, acc[f]);
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------
template <int D>
struct ForwardSmem {
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + Dims<D>::kTileBytes;
  static constexpr int kV = kK + Dims<D>::kTileBytes;
  static constexpr int kS = kV + Dims<D>::kTileBytes;
  static constexpr int kP = kS + Dims<D>::kSBytes;
  static constexpr int kStat = kP + Dims<D>::kPBytes;
  static constexpr int kBytes = kStat + kTile * 4;
};

// (About 90 lines on purpose, like the backward kernel below: one block's whole loop over the key
// tiles, kept in one function so its shared-memory and register use reads in one place.)
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(bf16* out, float* lse, const bf16* qkv, int N, int Hq, int Hkv, float scale_log2) {
  using L = ForwardSmem<D>;
  constexpr int kLd = Dims<D>::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem + L::kQ);
  bf16* Ks = reinterpret_cast<bf16*>(smem + L::kK);
  bf16* Vs = reinterpret_cast<bf16*>(smem + L::kV);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  bf16* Ps = reinterpret_cast<bf16*>(smem + L::kP);
  float* stat = reinterpret_cast<float*>(smem + L::kStat);  // per row: alpha, later 1/l

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_tiles = int(ceil_div(N, kTile));
  const int qi = n_tiles - 1 - int(blockIdx.x);  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = h / (Hq / Hkv);
  const int Htot = Hq + 2 * Hkv;
  const int64_t stride = int64_t(Htot) * D;  // elements between consecutive tokens
  const bf16* base = qkv + int64_t(b) * N * stride;
  const int q0 = qi * kTile;

  float* s_warp = Ss + warp * 16 * kLdS;
  bf16* p_warp = Ps + warp * 16 * kLdP;
  Acc rows, cols;
  fragment_coords(rows, cols, s_warp);

  load_tile<D>(Qs, base + int64_t(h) * D, stride, q0, N);

  Acc o[D / 16];
  for (int f = 0; f < D / 16; ++f) wmma::fill_fragment(o[f], 0.0f);
  const int my_row = lane / 2, half = lane % 2;  // lanes 2r and 2r+1 share row r of the warp
  const int q_pos = q0 + warp * 16 + my_row;
  float m_run = -INFINITY, l_run = 0.0f;

  for (int j = 0; j <= qi; ++j) {
    const int k0 = j * kTile;
    __syncthreads();  // all warps are done with the previous K, V (and Q is written)
    load_tile<D>(Ks, base + int64_t(Hq + g) * D, stride, k0, N);
    load_tile<D>(Vs, base + int64_t(Hq + Hkv + g) * D, stride, k0, N);
    __syncthreads();

    // S = Q_w K^T: 16 x 64 fp32, to smem for the row statistics
    Acc s[4];
    mma_rows_by_tile_t<D>(s, Qs + warp * 16 * kLd, kLd, Ks, kLd);
    for (int n = 0; n < 4; ++n) wmma::store_matrix_sync(s_warp + n * 16, s[n], kLdS, wmma::mem_row_major);
    __syncwarp();

    // online softmax of row my_row over this tile's 64 columns (32 per lane)
    const float* srow = s_warp + my_row * kLdS + half * 32;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int k_pos = k0 + half * 32 + c;
      if (k_pos <= q_pos) mx = fmaxf(mx, srow[c] * scale_log2);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);  // finite: column k0 <= q_pos for every j <= qi
    const float alpha = exp2f(m_run - m_new);
    bf16* prow = p_warp + my_row * kLdP + half * 32;
    float sum = 0.0f;
    for (int c = 0; c < 32; ++c) {
      const int k_pos = k0 + half * 32 + c;
      const float p = k_pos <= q_pos ? exp2f(srow[c] * scale_log2 - m_new) : 0.0f;
      sum += p;
      prow[c] = __float2bfloat16(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    if (half == 0) stat[warp * 16 + my_row] = alpha;
    __syncwarp();

    // O = O * alpha + P V
    for (int f = 0; f < D / 16; ++f)
      for (int e = 0; e < o[f].num_elements; ++e) o[f].x[e] *= stat[warp * 16 + int(rows.x[e])];
    mma_p_by_tile<D>(o, p_warp, Vs, kLd);
    __syncwarp();  // stat is rewritten by the next tile (after a __syncthreads anyway)
  }

  // epilogue: O / l, lse
  if (half == 0) stat[warp * 16 + my_row] = 1.0f / l_run;
  if (half == 0 && q_pos < N) lse[(int64_t(b) * Hq + h) * N + q_pos] = (m_run + log2f(l_run)) * kLn2;
  __syncwarp();
  for (int f = 0; f < D / 16; ++f)
    for (int e = 0; e < o[f].num_elements; ++e) {
      const int r = warp * 16 + int(rows.x[e]);
      const int t = q0 + r;
      if (t < N)
        out[((int64_t(b) * N + t) * Hq + h) * D + f * 16 + int(cols.x[e])] = __float2bfloat16(o[f].x[e] * stat[r]);
    }
}

template <int D>
void attention_forward_launch(bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv,
                              cudaStream_t stream) {
  const int bytes = ForwardSmem<D>::kBytes;
  CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid(unsigned(ceil_div(N, kTile)), unsigned(Hq), unsigned(B));
  const float scale_log2 = kLog2e / sqrtf(float(D));
  attention_forward_kernel<D><<<grid, kThreads, bytes, stream>>>(out, lse, qkv, N, Hq, Hkv, scale_log2);
  CUDA_CHECK_LAUNCH("attention_forward_kernel");
}

// ---- backward pass 1: dK, dV -------------------------------------------------------------------
template <int D>
struct BackwardKVSmem {
  static constexpr int kK = 0;
  static constexpr int kV = kK + Dims<D>::kTileBytes;
  static constexpr int kQ = kV + Dims<D>::kTileBytes;
  static constexpr int kdO = kQ + Dims<D>::kTileBytes;
  static constexpr int kP = kdO + Dims<D>::kTileBytes;
  static constexpr int kdS = kP + Dims<D>::kPBytes;
  static constexpr int kLse = kdS + Dims<D>::kPBytes;
  static constexpr int kDvec = kLse + kTile * 4;
  static constexpr int kBytes = kDvec + kTile * 4;
};

// dvec: [B, Hq, N] = rowsum(dout * out) (fp32). One block's whole loop over the query tiles
// (about 90 lines: see the forward kernel).
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kv_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                 const float* dvec, int N, int Hq, int Hkv, float scale) {
  using L = BackwardKVSmem<D>;
  constexpr int kLd = Dims<D>::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem + L::kK);
  bf16* Vs = reinterpret_cast<bf16*>(smem + L::kV);
  bf16* Qs = reinterpret_cast<bf16*>(smem + L::kQ);
  bf16* dOs = reinterpret_cast<bf16*>(smem + L::kdO);
  bf16* Ps = reinterpret_cast<bf16*>(smem + L::kP);
  bf16* dSs = reinterpret_cast<bf16*>(smem + L::kdS);
  float* lse_s = reinterpret_cast<float*>(smem + L::kLse);   // lse * log2e per query row
  float* dvec_s = reinterpret_cast<float*>(smem + L::kDvec);

  const int warp = threadIdx.x / 32;
  const int n_tiles = int(ceil_div(N, kTile));
  const int kj = blockIdx.x;  // key tile; small kj has the most query tiles and starts first
  const int g = blockIdx.y, b = blockIdx.z;
  const int group = Hq / Hkv;
  const int Htot = Hq + 2 * Hkv;
  const int64_t stride = int64_t(Htot) * D;
  const int64_t dout_stride = int64_t(Hq) * D;
  const bf16* base = qkv + int64_t(b) * N * stride;
  const bf16* dout_base = dout + int64_t(b) * N * dout_stride;
  const int k0 = kj * kTile;
  const float scale_log2 = scale * kLog2e;

  bf16* p_warp = Ps + warp * 16 * kLdP;
  bf16* ds_warp = dSs + warp * 16 * kLdP;
  Acc rows, cols;
  fragment_coords(rows, cols, reinterpret_cast<float*>(p_warp));  // 1 KiB of the warp's 2.25 KiB

  load_tile<D>(Ks, base + int64_t(Hq + g) * D, stride, k0, N);
  load_tile<D>(Vs, base + int64_t(Hq + Hkv + g) * D, stride, k0, N);

  Acc dk[D / 16], dv[D / 16];
  for (int f = 0; f < D / 16; ++f) {
    wmma::fill_fragment(dk[f], 0.0f);
    wmma::fill_fragment(dv[f], 0.0f);
  }

  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int qi = kj; qi < n_tiles; ++qi) {
      const int q0 = qi * kTile;
      __syncthreads();  // previous Q, dO, stats no longer read (and K, V written)
      load_tile<D>(Qs, base + int64_t(h) * D, stride, q0, N);
      load_tile<D>(dOs, dout_base + int64_t(h) * D, dout_stride, q0, N);
      load_row_stats(lse_s, lse + (int64_t(b) * Hq + h) * N, q0, N, kLog2e);
      load_row_stats(dvec_s, dvec + (int64_t(b) * Hq + h) * N, q0, N, 1.0f);
      __syncthreads();

      // P^T = exp2(S^T * scale * log2e - lse * log2e), S^T = K_w Q^T (16 keys x 64 queries)
      Acc s[4];
      mma_rows_by_tile_t<D>(s, Ks + warp * 16 * kLd, kLd, Qs, kLd);
      for (int n = 0; n < 4; ++n)
        for (int e = 0; e < s[n].num_elements; ++e) {
          const int r = int(rows.x[e]), c = n * 16 + int(cols.x[e]);
          const int k_pos = k0 + warp * 16 + r, q_pos = q0 + c;
          const float p = (k_pos <= q_pos && q_pos < N) ? exp2f(s[n].x[e] * scale_log2 - lse_s[c]) : 0.0f;
          s[n].x[e] = p;
          p_warp[r * kLdP + c] = __float2bfloat16(p);
        }
      __syncwarp();
      mma_p_by_tile<D>(dv, p_warp, dOs, kLd);  // dV_w += P^T dO

      // dP^T = V_w dO^T; dS^T = P^T * (dP^T - D)
      Acc dp[4];
      mma_rows_by_tile_t<D>(dp, Vs + warp * 16 * kLd, kLd, dOs, kLd);
      for (int n = 0; n < 4; ++n)
        for (int e = 0; e < dp[n].num_elements; ++e) {
          const int r = int(rows.x[e]), c = n * 16 + int(cols.x[e]);
          ds_warp[r * kLdP + c] = __float2bfloat16(s[n].x[e] * (dp[n].x[e] - dvec_s[c]));
        }
      __syncwarp();
      mma_p_by_tile<D>(dk, ds_warp, Qs, kLd);  // dK_w += dS^T Q
    }
  }

  bf16* dk_base = dqkv + int64_t(b) * N * stride + int64_t(Hq + g) * D;
  bf16* dv_base = dqkv + int64_t(b) * N * stride + int64_t(Hq + Hkv + g) * D;
  for (int f = 0; f < D / 16; ++f)
    for (int e = 0; e < dk[f].num_elements; ++e) {
      const int t = k0 + warp * 16 + int(rows.x[e]);
      const int c = f * 16 + int(cols.x[e]);
      if (t < N) {
        dk_base[int64_t(t) * stride + c] = __float2bfloat16(dk[f].x[e] * scale);
        dv_base[int64_t(t) * stride + c] = __float2bfloat16(dv[f].x[e]);
      }
    }
}

// ---- backward pass 2: dQ -----------------------------------------------------------------------
template <int D>
struct BackwardQSmem {
  static constexpr int kQ = 0;
  static constexpr int kdO = kQ + Dims<D>::kTileBytes;
  static constexpr int kK = kdO + Dims<D>::kTileBytes;
  static constexpr int kV = kK + Dims<D>::kTileBytes;
  static constexpr int kdS = kV + Dims<D>::kTileBytes;
  static constexpr int kLse = kdS + Dims<D>::kPBytes;
  static constexpr int kDvec = kLse + kTile * 4;
  static constexpr int kBytes = kDvec + kTile * 4;
};

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_backward_q_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                const float* dvec, int N, int Hq, int Hkv, float scale) {
  using L = BackwardQSmem<D>;
  constexpr int kLd = Dims<D>::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem + L::kQ);
  bf16* dOs = reinterpret_cast<bf16*>(smem + L::kdO);
  bf16* Ks = reinterpret_cast<bf16*>(smem + L::kK);
  bf16* Vs = reinterpret_cast<bf16*>(smem + L::kV);
  bf16* dSs = reinterpret_cast<bf16*>(smem + L::kdS);
  float* lse_s = reinterpret_cast<float*>(smem + L::kLse);
  float* dvec_s = reinterpret_cast<float*>(smem + L::kDvec);

  const int warp = threadIdx.x / 32;
  const int n_tiles = int(ceil_div(N, kTile));
  const int qi = n_tiles - 1 - int(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = h / (Hq / Hkv);
  const int Htot = Hq + 2 * Hkv;
  const int64_t stride = int64_t(Htot) * D;
  const int64_t dout_stride = int64_t(Hq) * D;
  const bf16* base = qkv + int64_t(b) * N * stride;
  const int q0 = qi * kTile;
  const float scale_log2 = scale * kLog2e;

  bf16* ds_warp = dSs + warp * 16 * kLdP;
  Acc rows, cols;
  fragment_coords(rows, cols, reinterpret_cast<float*>(ds_warp));

  load_tile<D>(Qs, base + int64_t(h) * D, stride, q0, N);
  load_tile<D>(dOs, dout + int64_t(b) * N * dout_stride + int64_t(h) * D, dout_stride, q0, N);
  load_row_stats(lse_s, lse + (int64_t(b) * Hq + h) * N, q0, N, kLog2e);
  load_row_stats(dvec_s, dvec + (int64_t(b) * Hq + h) * N, q0, N, 1.0f);

  Acc dq[D / 16];
  for (int f = 0; f < D / 16; ++f) wmma::fill_fragment(dq[f], 0.0f);

  for (int kj = 0; kj <= qi; ++kj) {
    const int k0 = kj * kTile;
    __syncthreads();  // previous K, V no longer read (and Q, dO, stats written)
    load_tile<D>(Ks, base + int64_t(Hq + g) * D, stride, k0, N);
    load_tile<D>(Vs, base + int64_t(Hq + Hkv + g) * D, stride, k0, N);
    __syncthreads();

    Acc s[4], dp[4];
    mma_rows_by_tile_t<D>(s, Qs + warp * 16 * kLd, kLd, Ks, kLd);    // S = Q_w K^T
    mma_rows_by_tile_t<D>(dp, dOs + warp * 16 * kLd, kLd, Vs, kLd);  // dP = dO_w V^T
    for (int n = 0; n < 4; ++n)
      for (int e = 0; e < s[n].num_elements; ++e) {
        const int r = int(rows.x[e]), c = n * 16 + int(cols.x[e]);
        const int q_pos = q0 + warp * 16 + r, k_pos = k0 + c;
        const float p = (k_pos <= q_pos && q_pos < N)
                            ? exp2f(s[n].x[e] * scale_log2 - lse_s[warp * 16 + r]) : 0.0f;
        ds_warp[r * kLdP + c] = __float2bfloat16(p * (dp[n].x[e] - dvec_s[warp * 16 + r]));
      }
    __syncwarp();
    mma_p_by_tile<D>(dq, ds_warp, Ks, kLd);  // dQ_w += dS K
  }

  bf16* dq_base = dqkv + int64_t(b) * N * stride + int64_t(h) * D;
  for (int f = 0; f < D / 16; ++f)
    for (int e = 0; e < dq[f].num_elements; ++e) {
      const int t = q0 + warp * 16 + int(rows.x[e]);
      if (t < N) dq_base[int64_t(t) * stride + f * 16 + int(cols.x[e])] = __float2bfloat16(dq[f].x[e] * scale);
    }
}

// dvec: [B, Hq, N] fp32 computed beforehand (attention.cu).
template <int D>
void attention_backward_launch(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                               const float* dvec, int B, int N, int Hq, int Hkv, cudaStream_t stream) {
  const float scale = 1.0f / sqrtf(float(D));
  const unsigned tiles = unsigned(ceil_div(N, kTile));
  const int kv_bytes = BackwardKVSmem<D>::kBytes;
  CUDA_CHECK(cudaFuncSetAttribute(attention_backward_kv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kv_bytes));
  attention_backward_kv_kernel<D><<<dim3(tiles, unsigned(Hkv), unsigned(B)), kThreads, kv_bytes, stream>>>(
      dqkv, dout, qkv, lse, dvec, N, Hq, Hkv, scale);
  CUDA_CHECK_LAUNCH("attention_backward_kv_kernel");
  const int q_bytes = BackwardQSmem<D>::kBytes;
  CUDA_CHECK(cudaFuncSetAttribute(attention_backward_q_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  q_bytes));
  attention_backward_q_kernel<D><<<dim3(tiles, unsigned(Hq), unsigned(B)), kThreads, q_bytes, stream>>>(
      dqkv, dout, qkv, lse, dvec, N, Hq, Hkv, scale);
  CUDA_CHECK_LAUNCH("attention_backward_q_kernel");
}

}  // namespace ulysses::cuda::attention
