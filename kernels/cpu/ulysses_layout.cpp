// The four layout transforms around the Ulysses all-to-alls (see kernels/cpu/cpu_ops.h):
// pack/unpack by heads (which peer gets which heads) and by sequence (which peer owns which
// tokens). Pure copies: each element moves once, so they are memory-bound and trivially exact.
#include <cstring>

#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

void ulysses_pack_heads(float* dst, const float* src, const int32_t* heads,
                        const int64_t* head_offsets, int P, int B, int T, int Htot, int d, int b_begin,
                        int b_end, int t_begin, int t_end) {
  // dst block p starts after the blocks of peers < p: B*T*d*head_offsets[p] elements; row (b, t)
  // of it at (b*T + t)*n_p*d, whichever rows a call packs.
  for (int p = 0; p < P; ++p) {
    const int64_t n_p = head_offsets[p + 1] - head_offsets[p];
    float* block = dst + int64_t(B) * T * d * head_offsets[p];
    const int32_t* map = heads + head_offsets[p];
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = b_begin; b < b_end; ++b)
      for (int t = t_begin; t < t_end; ++t) {
        const float* row = src + (int64_t(b) * T + t) * Htot * d;
        float* out = block + (int64_t(b) * T + t) * n_p * d;
        for (int64_t j = 0; j < n_p; ++j) std::memcpy(out + j * d, row + int64_t(map[j]) * d, sizeof(float) * d);
      }
  }
}

void ulysses_unpack_heads(float* dst, const float* src, const int32_t* heads,
                          const int64_t* head_offsets, int P, int B, int T, int Htot, int d,
                          bool accumulate, int b_begin, int b_end, int t_begin, int t_end) {
  // Peers are visited in order, so a head listed for several peers sums deterministically.
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = b_begin; b < b_end; ++b)
    for (int t = t_begin; t < t_end; ++t) {
      float* row = dst + (int64_t(b) * T + t) * Htot * d;
      for (int p = 0; p < P; ++p) {
        const int64_t n_p = head_offsets[p + 1] - head_offsets[p];
        const float* in = src + int64_t(B) * T * d * head_offsets[p] + (int64_t(b) * T + t) * n_p * d;
        const int32_t* map = heads + head_offsets[p];
        for (int64_t j = 0; j < n_p; ++j) {
          float* o = row + int64_t(map[j]) * d;
          const float* i = in + j * d;
          if (accumulate)
            for (int k = 0; k < d; ++k) o[k] += i[k];
          else
            std::memcpy(o, i, sizeof(float) * d);
        }
      }
    }
}

void ulysses_pack_sequence(float* dst, const float* src, int P, int B, int T, int h, int d) {
  const int64_t row = int64_t(h) * d;  // one token's elements
#pragma omp parallel for collapse(2) schedule(static)
  for (int s = 0; s < P; ++s)
    for (int b = 0; b < B; ++b)
      std::memcpy(dst + ((int64_t(s) * B + b) * T) * row, src + (int64_t(b) * P * T + int64_t(s) * T) * row,
                  sizeof(float) * T * row);
}

void ulysses_unpack_sequence(float* dst, const float* src, int P, int B, int T, int h, int d) {
  const int64_t row = int64_t(h) * d;
#pragma omp parallel for collapse(2) schedule(static)
  for (int s = 0; s < P; ++s)
    for (int b = 0; b < B; ++b)
      std::memcpy(dst + (int64_t(b) * P * T + int64_t(s) * T) * row, src + ((int64_t(s) * B + b) * T) * row,
                  sizeof(float) * T * row);
}

}  // namespace ulysses::cpu
