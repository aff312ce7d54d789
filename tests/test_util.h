// Helpers shared by the test executables.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

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

// The values of `key` in a metrics JSON-lines file, as written (shortest exact decimal form).
inline std::vector<std::string> field_values(const std::filesystem::path& metrics, const std::string& key) {
  std::ifstream in(metrics);
  std::vector<std::string> out;
  std::string line;
  const std::string k = "\"" + key + "\": ";
  while (std::getline(in, line)) {
    const size_t at = line.find(k);
    if (at == std::string::npos) continue;
    const size_t b = at + k.size();
    out.push_back(line.substr(b, line.find_first_of(",}", b) - b));
  }
  return out;
}

// Built with AddressSanitizer (gcc defines __SANITIZE_ADDRESS__, clang has the feature): its
// allocator and shadow memory change the RSS, so memory measurements are skipped.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
#else
inline constexpr bool kAddressSanitizer = false;
#endif

}  // namespace ulysses::test
