// Helpers shared by the test executables.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ulysses::test {

// max |a - b| / max |b| over n elements: the "relative to the largest magnitude" difference the
// equivalence tests bound (elementwise relative error is meaningless for values near zero).
inline double max_rel_diff(const float* a, const float* b, int64_t n) {
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, double(std::abs(a[i] - b[i])));
    scale = std::max(scale, double(std::abs(b[i])));
  }
  return diff / scale;
}

template <typename Vec>
double max_rel_diff(const Vec& a, const Vec& b) {
  return max_rel_diff(a.data(), b.data(), int64_t(b.size()));
}

}  // namespace ulysses::test
