#include "core/base/tensor.h"

#include <fmt/format.h>

#include "core/base/error.h"

namespace ulysses {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::u16: return "u16";
    case DType::f64: return "f64";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

Tensor::Tensor(void* p, std::initializer_list<int64_t> dims, DType t, Device d)
    : data(p), dtype(t), device(d) {
  ULYSSES_ASSERT(dims.size() <= size_t(kMaxDims), "too many dims ({})", dims.size());
  for (int64_t v : dims) shape[ndim++] = v;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

std::string Tensor::describe() const {
  std::string s = fmt::format("{}[", dtype_name(dtype));
  for (int i = 0; i < ndim; ++i) s += fmt::format("{}{}", i ? ", " : "", shape[i]);
  return s + fmt::format("] on {}", device_name(device));
}

float* Tensor::f32() const {
  ULYSSES_ASSERT(dtype == DType::f32, "expected f32, got {}", describe());
  return static_cast<float*>(data);
}

int32_t* Tensor::i32() const {
  ULYSSES_ASSERT(dtype == DType::i32, "expected i32, got {}", describe());
  return static_cast<int32_t*>(data);
}

Tensor Tensor::rows(int64_t row_begin, int64_t nrows) const {
  ULYSSES_ASSERT(ndim >= 1 && row_begin >= 0 && row_begin + nrows <= shape[0],
                 "rows [{}, {}) out of {}", row_begin, row_begin + nrows, describe());
  Tensor t = *this;
  const int64_t row_elems = numel() / (shape[0] ? shape[0] : 1);
  t.data = static_cast<char*>(data) + size_t(row_begin * row_elems) * dtype_size(dtype);
  t.shape[0] = nrows;
  return t;
}

Tensor Tensor::reshape(std::initializer_list<int64_t> dims) const {
  Tensor t(data, dims, dtype, device);
  ULYSSES_ASSERT(t.numel() == numel(), "reshape of {} to {} elements", describe(), t.numel());
  return t;
}

}  // namespace ulysses
