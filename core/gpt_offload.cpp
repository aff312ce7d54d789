// GPT's traffic between pinned host memory and the device (core/gpt.h), both cuda only:
//   GPT::HostStaging and GPT::upload_input: a micro-batch's int32 inputs go to the device through
//   pinned host rows, so the copies are asynchronous (on cpu upload_input is a plain copy);
//   GPT::CheckpointOffload: runtime.offload = checkpoints, the layer outputs that full recompute
//   stores, copied to pinned host memory in forward and back in backward on a second stream.
// The structs are declared in core/gpt_internal.h; forward() and backward() (core/gpt.cpp) call
// the offload at the layer boundaries.
#include <cstring>
#include <stdexcept>

#include "core/base/error.h"
#include "core/gpt_internal.h"
#ifdef ULYSSES_CUDA
#include "kernels/cuda/cuda_check.h"  // cuda_runtime.h: through core/gpt_internal.h
#endif

namespace ulysses {

// ---- the pinned input staging -------------------------------------------------------------------

GPT::HostStaging::HostStaging(int64_t rows) : row(rows) {
#ifdef ULYSSES_CUDA
  CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&data), size_t(3 * rows) * 4, cudaHostAllocDefault));
#else
  throw std::runtime_error("pinned host memory, but ulysses was built without CUDA");
#endif
}

GPT::HostStaging::~HostStaging() {
#ifdef ULYSSES_CUDA
  if (data) cudaFreeHost(data);  // not checked: destructors must not throw
#endif
}

void GPT::upload_input(Tensor dst, const int32_t* host, int slot) {
  const Tensor src(const_cast<int32_t*>(host), {dst.numel()}, DType::i32, Device::cpu);
  if (device_ == Device::cpu) {
    ops::copy(ctx_, dst, src);
    return;
  }
  // through pinned memory, so the copy is asynchronous (see HostStaging for why reuse is safe)
  const Tensor pinned = staging_->slot(slot);
  std::memcpy(pinned.data, host, pinned.bytes());
  ops::copy(ctx_, dst, pinned);
}

// ---- the offloaded checkpoints ------------------------------------------------------------------

// The schedule (the copies run on CheckpointOffload::stream, ordered by events only):
//   forward, after layer l (offloaded):  model records `ready`, copy stream waits for it,
//                                        host[l] <- slot; records out[l]
//   forward, before layer l:             model waits out[l - 3] (slot l % 3 held layer l - 3)
//   backward, before layer l:            model waits in[l - 1] (its input, prefetched a layer
//                                        ago); if l - 2 is offloaded: model records `ready`
//                                        (layer l + 1, the slot's last user, is done), copy
//                                        stream waits, slot (l - 2) % 3 <- host[l - 2]; records in[l - 2]
// Layers L-3..L-1 are never copied: their slots are untouched until backward needs them (the
// top one by the final LayerNorm's backward, then each as layer l + 1's input), and layer l's
// recomputed forward in backward rewrites slot l % 3, whose checkpoint (layer l + 1's input) is
// no longer needed. Every copy is waited for by the model's stream before its slot is rewritten
// (out) or read (in), so when the micro-batch's loss sum synchronises the model's stream, the
// copy stream is idle too.

GPT::CheckpointOffload::CheckpointOffload(int layers, size_t bytes_per_layer) : L(layers), layer_bytes(bytes_per_layer) {
#ifdef ULYSSES_CUDA
  const int n = offloaded_checkpoint_layers(L);
  try {
    if (n > 0) CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), size_t(n) * layer_bytes, cudaHostAllocDefault));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    out.assign(size_t(n), nullptr);
    in.assign(size_t(n), nullptr);
    for (int l = 0; l < n; ++l) {
      CUDA_CHECK(cudaEventCreateWithFlags(&out[size_t(l)], cudaEventDisableTiming));
      CUDA_CHECK(cudaEventCreateWithFlags(&in[size_t(l)], cudaEventDisableTiming));
    }
  } catch (...) {
    release();
    throw;
  }
#else
  throw std::runtime_error("runtime.offload: checkpoints, but ulysses was built without CUDA");
#endif
}

void GPT::CheckpointOffload::release() {
#ifdef ULYSSES_CUDA
  if (stream) cudaStreamSynchronize(stream);  // copies in flight read or write `host`
  for (cudaEvent_t e : out)
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : in)
    if (e) cudaEventDestroy(e);
  if (ready) cudaEventDestroy(ready);
  if (stream) cudaStreamDestroy(stream);
  if (host) cudaFreeHost(host);
#endif
  host = nullptr;
}

#ifdef ULYSSES_CUDA
void GPT::CheckpointOffload::follow(cudaStream_t model) {
  CUDA_CHECK(cudaEventRecord(ready, model));
  CUDA_CHECK(cudaStreamWaitEvent(stream, ready, 0));
}
#endif

void GPT::CheckpointOffload::before_forward([[maybe_unused]] int l, [[maybe_unused]] void* model) {
#ifdef ULYSSES_CUDA
  if (offloaded(l - kCheckpointSlots)) CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(model), out[size_t(l - kCheckpointSlots)], 0));
#endif
}

void GPT::CheckpointOffload::after_forward([[maybe_unused]] int l, [[maybe_unused]] void* model,
                                           [[maybe_unused]] const Tensor& slot) {
#ifdef ULYSSES_CUDA
  if (!offloaded(l)) return;
  ULYSSES_ASSERT(slot.bytes() == layer_bytes, "checkpoint slot of {} bytes, expected {}", slot.bytes(), layer_bytes);
  follow(static_cast<cudaStream_t>(model));
  CUDA_CHECK(cudaMemcpyAsync(host + size_t(l) * layer_bytes, slot.data, layer_bytes, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaEventRecord(out[size_t(l)], stream));
#endif
}

void GPT::CheckpointOffload::before_backward([[maybe_unused]] int l, [[maybe_unused]] void* model,
                                             [[maybe_unused]] const Tensor& slot_below) {
#ifdef ULYSSES_CUDA
  cudaStream_t m = static_cast<cudaStream_t>(model);
  if (offloaded(l - 1)) CUDA_CHECK(cudaStreamWaitEvent(m, in[size_t(l - 1)], 0));
  if (offloaded(l - 2)) {
    ULYSSES_ASSERT(slot_below.bytes() == layer_bytes, "checkpoint slot of {} bytes, expected {}", slot_below.bytes(),
                   layer_bytes);
    follow(m);
    CUDA_CHECK(cudaMemcpyAsync(slot_below.data, host + size_t(l - 2) * layer_bytes, layer_bytes,
                               cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaEventRecord(in[size_t(l - 2)], stream));
  }
#endif
}

size_t GPT::offloaded_checkpoint_bytes() const {
  return offload_ ? size_t(offloaded_checkpoint_layers(shape_.L)) * offload_->layer_bytes : 0;
}

}  // namespace ulysses
