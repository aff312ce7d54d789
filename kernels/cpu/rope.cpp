// Rotary position embedding (GPT-NeoX / Llama "rotate half"), fp32 CPU reference, in place.
// x: [rows, n_heads, d] with a row stride of row_stride floats. For row r at global position
// p = positions[r], head h, i in [0, d/2): theta_i = p * base^(-2i/d) and
//   (x[i], x[i + d/2]) <- (x[i] cos - x[i+d/2] sin, x[i] sin + x[i+d/2] cos).
// The backward applies the transpose, i.e. the rotation by -theta.
// The angles are formed in double: at positions near 10^6 a float angle would lose the low
// frequencies' phase. cos/sin are computed once per row and shared by all heads.
#include <cmath>
#include <vector>

#include "core/base/error.h"
#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

namespace {

// sign = +1: forward rotation; -1: its transpose.
void rope_rotate(float* x, const int32_t* positions, int64_t rows, int n_heads, int d,
                 int64_t row_stride, float base, float sign) {
  ULYSSES_ASSERT(d % 2 == 0, "rope: head dimension d={} must be even", d);
  const int half = d / 2;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; i++) inv_freq[i] = std::pow(double(base), -2.0 * i / d);
#pragma omp parallel if (rows * n_heads * d > 32768)
  {
    std::vector<float> cs(half), sn(half);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const double p = positions[r];
      for (int i = 0; i < half; i++) {
        const double theta = p * inv_freq[i];
        cs[i] = float(std::cos(theta));
        sn[i] = sign * float(std::sin(theta));
      }
      for (int h = 0; h < n_heads; h++) {
        float* lo = x + r * row_stride + int64_t(h) * d;
        float* hi = lo + half;
        for (int i = 0; i < half; i++) {
          const float a = lo[i], b = hi[i];
          lo[i] = a * cs[i] - b * sn[i];
          hi[i] = a * sn[i] + b * cs[i];
        }
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, const int32_t* positions, int64_t rows, int n_heads, int d,
                  int64_t row_stride, float base) {
  rope_rotate(x, positions, rows, n_heads, d, row_stride, base, 1.0f);
}

void rope_backward(float* dx, const int32_t* positions, int64_t rows, int n_heads, int d,
                   int64_t row_stride, float base) {
  rope_rotate(dx, positions, rows, n_heads, d, row_stride, base, -1.0f);
}

}  // namespace ulysses::cpu
