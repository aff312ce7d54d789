// A tensor is a view: pointer, shape, dtype, device. It owns nothing; memory comes from an
// Arena (core/arena.h) allocated once up front. No autograd, no reference counting.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace ulysses {

enum class Device : uint8_t { cpu, cuda };
enum class DType : uint8_t { f32, bf16, i32, u16, f64 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::u16: return 2;
    case DType::f64: return 8;
  }
  return 0;
}
const char* dtype_name(DType t);
const char* device_name(Device d);

struct Tensor {
  static constexpr int kMaxDims = 6;
  void* data = nullptr;
  std::array<int64_t, kMaxDims> shape{};
  int ndim = 0;
  DType dtype = DType::f32;
  Device device = Device::cpu;

  Tensor() = default;
  Tensor(void* p, std::initializer_list<int64_t> dims, DType t = DType::f32, Device d = Device::cpu);

  int64_t numel() const;
  size_t bytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t size(int i) const { return shape[i < 0 ? ndim + i : i]; }
  bool empty() const { return data == nullptr || numel() == 0; }
  std::string describe() const;  // "f32[4, 128, 768] on cpu"

  float* f32() const;      // checked accessors: throw on a dtype mismatch
  int32_t* i32() const;
  // A view of rows [row_begin, row_begin + rows) along dim 0, other dims unchanged.
  Tensor rows(int64_t row_begin, int64_t rows) const;
  Tensor reshape(std::initializer_list<int64_t> dims) const;
};

}  // namespace ulysses
