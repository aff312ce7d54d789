#include "core/base/arena.h"

#include <cstdlib>
#include <cstring>
#include <utility>

#include "core/base/error.h"
#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>
#endif

namespace ulysses {

namespace {
constexpr size_t kAlign = 256;
size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

Arena::~Arena() {
  if (!base_) return;
#ifdef ULYSSES_CUDA
  if (device_ == Device::cuda) {
    cudaFree(base_);
    return;
  }
#endif
  std::free(base_);
}

Arena::Arena(Arena&& o) noexcept
    : name_(std::move(o.name_)), device_(o.device_), size_(o.size_), base_(o.base_) {
  o.base_ = nullptr;
  o.size_ = 0;
}

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    this->~Arena();
    new (this) Arena(std::move(o));
  }
  return *this;
}

size_t Arena::reserve(size_t bytes) {
  ULYSSES_ASSERT(base_ == nullptr, "arena '{}' is already allocated", name_);
  const size_t offset = size_;
  size_ += round_up(bytes);
  return offset;
}

void Arena::allocate(bool zero_memory) {
  ULYSSES_ASSERT(base_ == nullptr, "arena '{}' is already allocated", name_);
  const size_t bytes = size_ ? size_ : kAlign;
  if (device_ == Device::cpu) {
    base_ = std::aligned_alloc(kAlign, bytes);
    if (!base_)
      throw std::runtime_error(fmt::format("arena '{}': cannot allocate {:.3f} GiB of host memory",
                                           name_, double(bytes) / (1ull << 30)));
  } else {
#ifdef ULYSSES_CUDA
    cudaError_t e = cudaMalloc(&base_, bytes);
    if (e != cudaSuccess)
      throw std::runtime_error(fmt::format("arena '{}': cudaMalloc of {:.3f} GiB failed: {}", name_,
                                           double(bytes) / (1ull << 30), cudaGetErrorString(e)));
#else
    throw std::runtime_error("arena on cuda, but ulysses was built without CUDA");
#endif
  }
  if (zero_memory) zero();
}

void Arena::zero() {
  if (!base_) return;
  if (device_ == Device::cpu) {
    std::memset(base_, 0, size_ ? size_ : kAlign);
    return;
  }
#ifdef ULYSSES_CUDA
  // cudaMemset runs on the default stream and may return before it is done: wait, so work on
  // any other stream sees zeros (zero() runs at set-up only, never in the step)
  cudaError_t e = cudaMemset(base_, 0, size_);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess)
    throw std::runtime_error(fmt::format("arena '{}': cudaMemset failed: {}", name_, cudaGetErrorString(e)));
#endif
}

Tensor Arena::tensor(size_t offset, std::initializer_list<int64_t> dims, DType dtype) const {
  ULYSSES_ASSERT(base_ != nullptr, "arena '{}' is not allocated", name_);
  Tensor t(static_cast<char*>(base_) + offset, dims, dtype, device_);
  ULYSSES_ASSERT(offset + t.bytes() <= size_, "tensor {} at {} overruns arena '{}' ({} bytes)",
                 t.describe(), offset, name_, size_);
  return t;
}

}  // namespace ulysses
