// Token (+ learned position) embedding, forward and backward.
// Forward: one block per row; wte[token] + wpe[position] in fp32, 8 channels per thread with
// 16-byte loads when C % 8 == 0.
// Backward, deterministic without atomics and without a host sync:
//   1. values = 0..rows-1; a stable device radix sort (CUB) of (token, row) pairs groups the
//      rows of each token together, in increasing row order within a token;
//   2. one block per sorted position i; only the block where a run of equal tokens starts does
//      work: it owns dwte[token] and adds the run's dout rows, in order, channel by channel.
// The same again with positions for dwpe. A token that occurs k times costs one block O(k*C).
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void embedding_forward_kernel(bf16* out, const int32_t* tokens, const int32_t* positions,
                                         const bf16* wte, const bf16* wpe, int C, bool vec) {
  const int64_t r = blockIdx.x;
  const bf16* te = wte + int64_t(tokens[r]) * C;
  const bf16* pe = wpe ? wpe + int64_t(positions[r]) * C : nullptr;
  bf16* o = out + r * C;
  if (vec) {
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
      const Pack8 t = load_pack8(te + c);
      Pack8 y;
      if (pe) {
        const Pack8 p = load_pack8(pe + c);
        for (int k = 0; k < 8; ++k) y.v[k] = __float2bfloat16(__bfloat162float(t.v[k]) + __bfloat162float(p.v[k]));
      } else {
        y = t;
      }
      store_pack8(o + c, y);
    }
  } else {
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float p = pe ? __bfloat162float(pe[c]) : 0.0f;
      o[c] = __float2bfloat16(__bfloat162float(te[c]) + p);
    }
  }
}

__global__ void iota_kernel(int32_t* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = int32_t(i);
}

// keys: the sorted ids; rows: the original row of each sorted entry. dw[key] += sum of the run.
__global__ void embedding_backward_runs_kernel(float* dw, const bf16* dout, const uint32_t* keys,
                                               const int32_t* rows_of, int64_t rows, int C) {
  const int64_t i = blockIdx.x;
  const uint32_t key = keys[i];
  if (i > 0 && keys[i - 1] == key) return;  // not the start of a run: another block owns it
  int64_t end = i + 1;
  while (end < rows && keys[end] == key) ++end;
  float* w = dw + int64_t(key) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = i; j < end; ++j) acc += __bfloat162float(dout[int64_t(rows_of[j]) * C + c]);
    w[c] += acc;
  }
}

int bits_for(int n) {
  int bits = 1;
  while (bits < 32 && (int64_t(1) << bits) < int64_t(n)) ++bits;
  return bits;
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

size_t radix_temp_bytes(int64_t rows, int end_bit) {
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr),
                                             static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), int(rows), 0, end_bit));
  return bytes;
}

// Sorts (ids, 0..rows-1) by id and adds each run of dout rows to dw[id].
void backward_by_key(float* dw, const bf16* dout, const int32_t* ids, int64_t rows, int C, int id_limit,
                     void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  char* p = static_cast<char*>(scratch);
  const size_t vec = align256(sizeof(int32_t) * size_t(rows));
  uint32_t* keys_sorted = reinterpret_cast<uint32_t*>(p);
  int32_t* rows_in = reinterpret_cast<int32_t*>(p + vec);
  int32_t* rows_sorted = reinterpret_cast<int32_t*>(p + 2 * vec);
  void* temp = p + 3 * vec;
  // Sorting only the bits the ids use saves passes. The scratch was sized for all 32 bits
  // (embedding_backward_scratch_bytes); should CUB want more for fewer bits, sort all 32 (the same
  // stable order, since the ids are non-negative).
  int end_bit = bits_for(id_limit);
  size_t temp_bytes = radix_temp_bytes(rows, end_bit);
  if (3 * vec + temp_bytes > scratch_bytes) {
    end_bit = 32;
    temp_bytes = radix_temp_bytes(rows, end_bit);
  }
  if (3 * vec + temp_bytes > scratch_bytes)
    cuda_check_fail(__FILE__, __LINE__, "embedding_backward", "scratch smaller than embedding_backward_scratch_bytes()");
  iota_kernel<<<grid_for(rows, 256), 256, 0, stream>>>(rows_in, rows);
  CUDA_CHECK_LAUNCH("iota_kernel");
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, reinterpret_cast<const uint32_t*>(ids),
                                             keys_sorted, rows_in, rows_sorted, int(rows), 0, end_bit,
                                             stream));
  embedding_backward_runs_kernel<<<unsigned(rows), kThreads, 0, stream>>>(dw, dout, keys_sorted, rows_sorted,
                                                                          rows, C);
  CUDA_CHECK_LAUNCH("embedding_backward_runs_kernel");
}

}  // namespace

void embedding_forward(bf16* out, const int32_t* tokens, const int32_t* positions, const bf16* wte,
                       const bf16* wpe, int64_t rows, int C, cudaStream_t stream) {
  if (rows <= 0) return;
  const bool vec = C % 8 == 0 && is_aligned16(out) && is_aligned16(wte) && (!wpe || is_aligned16(wpe));
  embedding_forward_kernel<<<unsigned(rows), kThreads, 0, stream>>>(out, tokens, wpe ? positions : nullptr,
                                                                    wte, wpe, C, vec);
  CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

size_t embedding_backward_scratch_bytes(int64_t rows) {
  return 3 * align256(sizeof(int32_t) * size_t(rows)) + radix_temp_bytes(rows, 32);
}

void embedding_backward(float* dwte, float* dwpe, const bf16* dout, const int32_t* tokens,
                        const int32_t* positions, int64_t rows, int C, int vocab_size,
                        int max_positions, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (rows <= 0) return;
  if (dwte) backward_by_key(dwte, dout, tokens, rows, C, vocab_size, scratch, scratch_bytes, stream);
  if (dwpe) backward_by_key(dwpe, dout, positions, rows, C, max_positions, scratch, scratch_bytes, stream);
}

}  // namespace ulysses::cuda
