// ops::Context on cuda: the stream every op of a model is enqueued on, and the per-device state
// the ops need (see kernels/ops.h). Constructed on the CUDA device current at the time.
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/ops.h"

namespace ulysses::ops {

struct CudaState {
  cudaStream_t stream = nullptr;
};

Context::Context(Device d) : device(d) {
  if (d != Device::cuda) return;
  cuda = new CudaState;
  CUDA_CHECK(cudaStreamCreateWithFlags(&cuda->stream, cudaStreamNonBlocking));
}

Context::~Context() {
  if (!cuda) return;
  if (cuda->stream) cudaStreamDestroy(cuda->stream);  // not checked: destructors must not throw
  delete cuda;
  cuda = nullptr;
}

void* Context::stream() const { return cuda ? cuda->stream : nullptr; }

}  // namespace ulysses::ops
