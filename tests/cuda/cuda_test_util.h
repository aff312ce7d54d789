// Host-side helpers for the CUDA tests and benchmark: device buffers that upload/download fp32
// vectors (converting to bf16 where the buffer is bf16), NaN poisoning of outputs, a seeded RNG
// whose values are never (near) zero, bf16 rounding on the host, and the normalised error
//   err = max_i |got_i - ref_i| / max_i |ref_i|     (+inf if any got_i is NaN or inf).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace ulysses::cuda::test {

using bf16 = __nv_bfloat16;

struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {  // xorshift64*
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return uint32_t((state * 0x2545F4914F6CDD1Dull) >> 32);
  }
  float uniform() { return float(next() >> 8) / float(1u << 24); }  // [0, 1)
  // Uniform in [-scale, scale], with |x| >= scale/64 so that no input is (near) zero.
  float nonzero(float scale = 1.0f) {
    float x = (2.0f * uniform() - 1.0f) * scale;
    if (std::fabs(x) < scale / 64) x = x < 0 ? -scale / 64 : scale / 64;
    return x;
  }
  int below(int n) { return int(next() % uint32_t(n)); }
};

inline std::vector<float> random_vector(Rng& rng, size_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.nonzero(scale);
  return v;
}
inline float round_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }
inline std::vector<float> rounded_bf16(std::vector<float> v) {
  for (auto& x : v) x = round_bf16(x);
  return v;
}

// A device buffer of T (float, bf16, int32_t, double) holding n elements.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) { CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T))); }
  template <typename S>
  explicit DeviceBuffer(const std::vector<S>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void poison() { CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T))); }  // NaN for bf16, fp32 and fp64
  template <typename S>
  void upload(const std::vector<S>& host) {
    std::vector<T> tmp(n_);
    for (size_t i = 0; i < n_; ++i) tmp[i] = convert(host[i]);
    CUDA_CHECK(cudaMemcpy(p_, tmp.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> raw() const {
    std::vector<T> tmp(n_);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(tmp.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return tmp;
  }
  std::vector<float> download() const {
    const std::vector<T> tmp = raw();
    std::vector<float> out(n_);
    for (size_t i = 0; i < n_; ++i) out[i] = to_float(tmp[i]);
    return out;
  }

 private:
  template <typename S>
  static T convert(S x) {
    if constexpr (std::is_same_v<T, bf16>) return __float2bfloat16(float(x));
    else return T(x);
  }
  static float to_float(T x) {
    if constexpr (std::is_same_v<T, bf16>) return __bfloat162float(x);
    else return float(x);
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

inline double normalised_error(const std::vector<float>& got, const std::vector<float>& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double max_diff = 0.0, max_ref = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    max_diff = std::max(max_diff, std::fabs(double(got[i]) - double(ref[i])));
    max_ref = std::max(max_ref, std::fabs(double(ref[i])));
  }
  if (max_ref == 0.0) return max_diff == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  return max_diff / max_ref;
}

}  // namespace ulysses::cuda::test
