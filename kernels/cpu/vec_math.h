// exp, tanh, row max and row sum for the CPU kernels, written as plain arithmetic that the
// compiler vectorises (libm's expf/tanhf are scalar calls; a float max or sum reduction is not
// vectorised without -ffast-math). Internal to kernels/cpu; not an op.
//
// exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r
// (the Cephes expf coefficients), then 2^n through the exponent bits. Relative error below 1e-7
// (measured 8e-8, about one ulp) on [-87.3, 88.3]; below -87.7 it returns exactly 0 (n = -127
// gives a zero exponent field, so exp(-inf) = 0), above 88.3 it saturates at exp(88.3) ~ 2e38.
// The clamp is an integer min/max on the bits: GCC will not vectorise a float compare-and-select
// under its default -ftrapping-math.
#pragma once
#include <algorithm>
#include <bit>
#include <cstdint>

namespace ulysses::cpu {

// An integer that orders (non-NaN) floats like the floats themselves: the magnitude bits of a
// negative float are flipped. The map is its own inverse (float_from_key).
inline int32_t float_key(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}
inline float float_from_key(int32_t key) {
  return std::bit_cast<float>(key ^ ((key >> 31) & 0x7fffffff));
}

inline float exp_approx(float x) {
  const float xc = float_from_key(
      std::clamp(float_key(x), float_key(-88.0f), float_key(88.3f)));  // x in [-88, 88.3]
  // n = round(x / ln2) by the 1.5 * 2^23 trick (exact for |x / ln2| < 2^22, no libm call)
  const float t = xc * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 split in a short high part and a small low part
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  return er * std::bit_cast<float>((int32_t(n) + 127) << 23);  // n >= -127: 0 at the bottom
}

// tanh(u) = 1 - 2 / (e^{2u} + 1): +-1 at the ends without overflow trouble, absolute error
// about 2e-7 near 0 (where the relative error of this form is larger; GELU only needs absolute).
inline float tanh_approx(float u) { return 1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f); }

// max of x[0:n], n >= 1 (an integer max over float_key).
inline float max_of(const float* x, int64_t n) {
  int32_t k = float_key(x[0]);
  for (int64_t i = 1; i < n; i++) k = std::max(k, float_key(x[i]));
  return float_from_key(k);
}

// sum of x[0:n] in double, in 8 interleaved partial sums added in a fixed order (deterministic).
inline double sum_of(const float* x, int64_t n) {
  double lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) lane[k] += x[i + k];
  for (; i < n; i++) lane[0] += x[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// sum of x[0:n]^2 in double, the same way.
inline double sum_of_squares(const float* x, int64_t n) {
  double lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) lane[k] += double(x[i + k]) * x[i + k];
  for (; i < n; i++) lane[0] += double(x[i]) * x[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

}  // namespace ulysses::cpu
