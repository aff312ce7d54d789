// One contiguous allocation, carved into tensors before training starts. The model keeps one
// arena each for parameters, gradients, optimizer state and activations, so the training step
// itself never allocates. Device memory on cuda, 64-byte aligned host memory on cpu.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "core/base/tensor.h"

namespace ulysses {

class Arena {
 public:
  Arena() = default;
  Arena(std::string name, Device device) : name_(std::move(name)), device_(device) {}
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&& o) noexcept;
  Arena& operator=(Arena&& o) noexcept;

  // Two phases: reserve() every tensor (returns its byte offset), then allocate() once, then
  // tensor(offset, ...) gives the views. Each reservation is aligned to 256 bytes.
  size_t reserve(size_t bytes);
  void allocate(bool zero = true);
  Tensor tensor(size_t offset, std::initializer_list<int64_t> dims, DType dtype) const;
  void* base() const { return base_; }
  size_t bytes() const { return size_; }
  Device device() const { return device_; }
  const std::string& name() const { return name_; }
  void zero();  // memset 0 (cudaMemset on cuda)

 private:
  std::string name_;
  Device device_ = Device::cpu;
  size_t size_ = 0;
  void* base_ = nullptr;
};

}  // namespace ulysses
