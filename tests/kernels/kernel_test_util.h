// Helpers shared by the CPU kernel tests: a seeded random source, buffers with sentinel guards
// (to catch writes outside an output), float64 helpers and error measures.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <omp.h>

namespace ulysses::test {

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  float normal(float stddev = 1.0f) { return std::normal_distribution<float>(0.0f, stddev)(gen); }
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }  // [lo, hi]
  std::vector<float> normals(size_t n, float stddev = 1.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = normal(stddev);
    return v;
  }
  std::vector<int32_t> integers(size_t n, int lo, int hi) {
    std::vector<int32_t> v(n);
    for (int32_t& x : v) x = integer(lo, hi);
    return v;
  }
};

// n floats with kGuard sentinel floats before and after; intact() says whether the guards are
// bitwise untouched. Kernels under test write only through data().
class Guarded {
 public:
  static constexpr size_t kGuard = 67;
  static constexpr uint32_t kSentinelBits = 0x7fc0beefu;  // a NaN with a payload
  explicit Guarded(size_t n, float fill = 0.0f) : n_(n), buf_(n + 2 * kGuard) {
    for (size_t i = 0; i < kGuard; i++) {
      std::memcpy(&buf_[i], &kSentinelBits, 4);
      std::memcpy(&buf_[kGuard + n + i], &kSentinelBits, 4);
    }
    std::fill(data(), data() + n, fill);
  }
  Guarded(const std::vector<float>& v) : Guarded(v.size()) { std::copy(v.begin(), v.end(), data()); }
  float* data() { return buf_.data() + kGuard; }
  const float* data() const { return buf_.data() + kGuard; }
  size_t size() const { return n_; }
  float& operator[](size_t i) { return data()[i]; }
  std::vector<float> values() const { return {data(), data() + n_}; }
  bool intact() const {
    for (size_t i = 0; i < kGuard; i++) {
      uint32_t a, b;
      std::memcpy(&a, &buf_[i], 4);
      std::memcpy(&b, &buf_[kGuard + n_ + i], 4);
      if (a != kSentinelBits || b != kSentinelBits) return false;
    }
    return true;
  }

 private:
  size_t n_;
  std::vector<float> buf_;
};

// max_i |a_i - b_i| / max(max_i |b_i|, floor): the error normalised by the reference's scale.
inline double max_rel_error(const std::vector<double>& a, const std::vector<double>& b,
                            double floor = 1e-30) {
  double err = 0.0, scale = floor;
  for (size_t i = 0; i < a.size(); i++) {
    err = std::max(err, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return err / scale;
}
inline double max_rel_error(const std::vector<float>& a, const std::vector<double>& b,
                            double floor = 1e-30) {
  return max_rel_error(std::vector<double>(a.begin(), a.end()), b, floor);
}

// Runs f with the OpenMP thread count set to n, then restores it.
template <typename F>
void with_threads(int n, F&& f) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(n);
  f();
  omp_set_num_threads(before);
}

inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

}  // namespace ulysses::test
