// The Ulysses layout transforms around the two all-to-alls (semantics in cuda_ops.h and
// kernels/cpu/cpu_ops.h). Pure data movement:
//   pack_heads:   one block per token row (b, t) of the range asked for; each thread copies units of 16/4/2/1 bytes
//                 (the widest that divides a head's bytes and the pointers' alignment) from head
//                 heads[k] of the source row into peer p's block, p found from head_offsets;
//   unpack_heads: one block per token row; thread i owns element i of every head and walks the
//                 listed heads k in order (so a head listed twice is summed in peer order, by
//                 the same thread: no race);
//   pack/unpack_sequence: P strided 2-D copies (cudaMemcpy2DAsync), one per peer block.
#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

// The peer whose head range contains listed head k (P is small; a linear walk).
__device__ inline int peer_of(const int64_t* head_offsets, int P, int64_t k) {
  int p = 0;
  while (p + 1 < P && head_offsets[p + 1] <= k) ++p;
  return p;
}

// U: the copy unit; units_per_head = d * elem_bytes / sizeof(U).
// The token row (b * T + t, T = `tokens` per batch row) that block `block` of a launch over
// rows b in [b_begin, ...), t in [t_begin, t_begin + t_count) handles.
__device__ inline int64_t range_row(unsigned block, int tokens, int b_begin, int t_begin, int t_count) {
  return (int64_t(b_begin) + block / unsigned(t_count)) * tokens + t_begin + block % unsigned(t_count);
}

template <typename U>
__global__ void pack_heads_kernel(U* dst, const U* src, const int32_t* heads, const int64_t* head_offsets,
                                  int P, int64_t BT, int Htot, int units_per_head, int tokens, int b_begin,
                                  int t_begin, int t_count) {
  const int64_t row = range_row(blockIdx.x, tokens, b_begin, t_begin, t_count);  // b * T + t
  const int64_t total = head_offsets[P];
  for (int64_t idx = threadIdx.x; idx < total * units_per_head; idx += blockDim.x) {
    const int64_t k = idx / units_per_head;
    const int u = int(idx % units_per_head);
    const int p = peer_of(head_offsets, P, k);
    const int64_t n_p = head_offsets[p + 1] - head_offsets[p];
    const int64_t j = k - head_offsets[p];
    const int64_t d_unit = (BT * head_offsets[p] + row * n_p + j) * units_per_head + u;
    const int64_t s_unit = (row * Htot + heads[k]) * units_per_head + u;
    dst[d_unit] = src[s_unit];
  }
}

__device__ inline float load_f(const float* p) { return *p; }
__device__ inline float load_f(const bf16* p) { return __bfloat162float(*p); }
__device__ inline void store_f(float* p, float v) { *p = v; }
__device__ inline void store_f(bf16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__global__ void unpack_heads_kernel(T* dst, const T* src, const int32_t* heads, const int64_t* head_offsets,
                                    int P, int64_t BT, int Htot, int d, bool accumulate, int tokens, int b_begin,
                                    int t_begin, int t_count) {
  const int64_t row = range_row(blockIdx.x, tokens, b_begin, t_begin, t_count);  // b * T + t
  const int64_t total = head_offsets[P];
  int p = 0;
  for (int64_t k = 0; k < total; ++k) {
    while (p + 1 < P && head_offsets[p + 1] <= k) ++p;
    const int64_t n_p = head_offsets[p + 1] - head_offsets[p];
    const int64_t j = k - head_offsets[p];
    const T* in = src + (BT * head_offsets[p] + row * n_p + j) * d;
    T* out = dst + (row * Htot + heads[k]) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = load_f(in + i);
      store_f(out + i, accumulate ? load_f(out + i) + v : v);
    }
  }
}

// Strided copy of `height` rows of `width` bytes. cudaMemcpy2DAsync refuses pitches beyond the
// device's maximum (about 2 GiB); such rows (huge single sequences) are copied one by one.
void copy_rows(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
               cudaStream_t stream) {
  constexpr size_t kMaxPitch = size_t(1) << 31;
  if (height == 1 || dpitch >= kMaxPitch || spitch >= kMaxPitch) {
    for (size_t r = 0; r < height; ++r)
      CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                                 width, cudaMemcpyDeviceToDevice, stream));
  } else {
    CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToDevice, stream));
  }
}

size_t elem_bytes_of(DType t) {
  if (t != DType::bf16 && t != DType::f32)
    cuda_check_fail(__FILE__, __LINE__, "ulysses layout", "dtype must be bf16 or f32");
  return dtype_size(t);
}

}  // namespace

void ulysses_pack_heads(void* dst, const void* src, DType dtype, const int32_t* heads,
                        const int64_t* head_offsets, int P, int B, int T, int Htot, int d, int b_begin,
                        int b_end, int t_begin, int t_end, cudaStream_t stream) {
  const int64_t BT = int64_t(B) * T;
  const int64_t rows = int64_t(b_end - b_begin) * (t_end - t_begin);  // rows of the range: one block each
  if (BT <= 0 || d <= 0 || rows <= 0) return;
  const int tc = t_end - t_begin;
  const size_t head_bytes = elem_bytes_of(dtype) * size_t(d);
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  const unsigned grid = unsigned(rows);
  if (head_bytes % 16 == 0 && align % 16 == 0)
    pack_heads_kernel<uint4><<<grid, 128, 0, stream>>>(static_cast<uint4*>(dst), static_cast<const uint4*>(src),
                                                       heads, head_offsets, P, BT, Htot, int(head_bytes / 16), T,
                                                       b_begin, t_begin, tc);
  else if (head_bytes % 4 == 0 && align % 4 == 0)
    pack_heads_kernel<uint32_t><<<grid, 128, 0, stream>>>(static_cast<uint32_t*>(dst),
                                                          static_cast<const uint32_t*>(src), heads,
                                                          head_offsets, P, BT, Htot, int(head_bytes / 4), T,
                                                          b_begin, t_begin, tc);
  else
    pack_heads_kernel<uint16_t><<<grid, 128, 0, stream>>>(static_cast<uint16_t*>(dst),
                                                          static_cast<const uint16_t*>(src), heads,
                                                          head_offsets, P, BT, Htot, int(head_bytes / 2), T,
                                                          b_begin, t_begin, tc);
  CUDA_CHECK_LAUNCH("pack_heads_kernel");
}

void ulysses_unpack_heads(void* dst, const void* src, DType dtype, const int32_t* heads,
                          const int64_t* head_offsets, int P, int B, int T, int Htot, int d,
                          bool accumulate, int b_begin, int b_end, int t_begin, int t_end, cudaStream_t stream) {
  const int64_t BT = int64_t(B) * T;
  const int64_t rows = int64_t(b_end - b_begin) * (t_end - t_begin);
  if (BT <= 0 || d <= 0 || rows <= 0) return;
  const int tc = t_end - t_begin;
  elem_bytes_of(dtype);
  const int threads = d <= 64 ? 64 : 128;
  if (dtype == DType::bf16)
    unpack_heads_kernel<bf16><<<unsigned(rows), threads, 0, stream>>>(
        static_cast<bf16*>(dst), static_cast<const bf16*>(src), heads, head_offsets, P, BT, Htot, d, accumulate, T,
        b_begin, t_begin, tc);
  else
    unpack_heads_kernel<float><<<unsigned(rows), threads, 0, stream>>>(
        static_cast<float*>(dst), static_cast<const float*>(src), heads, head_offsets, P, BT, Htot, d, accumulate, T,
        b_begin, t_begin, tc);
  CUDA_CHECK_LAUNCH("unpack_heads_kernel");
}

void ulysses_pack_sequence(void* dst, const void* src, DType dtype, int P, int B, int T, int h, int d,
                           cudaStream_t stream) {
  const size_t row = elem_bytes_of(dtype) * size_t(h) * size_t(d);  // one token's bytes
  const size_t width = row * size_t(T);
  if (width == 0 || B <= 0) return;
  for (int s = 0; s < P; ++s)
    copy_rows(static_cast<char*>(dst) + size_t(s) * B * width, width, static_cast<const char*>(src) + size_t(s) * width,
              size_t(P) * width, width, size_t(B), stream);
}

void ulysses_unpack_sequence(void* dst, const void* src, DType dtype, int P, int B, int T, int h, int d,
                             cudaStream_t stream) {
  const size_t row = elem_bytes_of(dtype) * size_t(h) * size_t(d);
  const size_t width = row * size_t(T);
  if (width == 0 || B <= 0) return;
  for (int s = 0; s < P; ++s)
    copy_rows(static_cast<char*>(dst) + size_t(s) * width, size_t(P) * width,
              static_cast<const char*>(src) + size_t(s) * B * width, width, width, size_t(B), stream);
}

}  // namespace ulysses::cuda
