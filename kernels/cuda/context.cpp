// ops::Context on cuda: the stream every op of a model is enqueued on, and the per-device state
// the ops need (kernels/cuda/cuda_state.h, contract in kernels/ops.h). Constructed on the CUDA
// device current at the time; all allocation happens here or in the first step (scratch).
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_state.h"
#include "kernels/ops.h"

namespace ulysses::ops {

// The cuBLASLt workspace. The matmul bias gradient goes through bias_backward with the context
// scratch (no column limit), so the MatmulContext's own bias scratch is left minimal.
constexpr size_t kMatmulWorkspaceBytes = size_t(32) << 20;
constexpr int kMatmulBiasColumns = 8;

void* CudaState::scratch(size_t bytes) {
  if (bytes <= scratch_bytes) return scratch_ptr;
  if (scratch_ptr) CUDA_CHECK(cudaFreeAsync(scratch_ptr, stream));
  scratch_ptr = nullptr;
  scratch_bytes = 0;
  CUDA_CHECK(cudaMallocAsync(&scratch_ptr, bytes, stream));
  scratch_bytes = bytes;
  return scratch_ptr;
}

namespace {
// Frees what `s` holds on its device; no throwing (used by the destructor and after a failed
// constructor), so the statuses are deliberately ignored.
void release(CudaState* s) {
  int previous = 0;
  const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != s->device;
  if (restore) cudaSetDevice(s->device);
  if (s->stream) cudaStreamSynchronize(s->stream);  // nothing may still use the buffers below
  if (s->scratch_ptr) cudaFreeAsync(s->scratch_ptr, s->stream);
  if (s->stream) cudaStreamSynchronize(s->stream);
  s->matmul.reset();
  s->cudnn_attention.reset();
  if (s->reduce_result) cudaFree(s->reduce_result);
  if (s->reduce_host) cudaFreeHost(s->reduce_host);
  if (s->stream) cudaStreamDestroy(s->stream);
  if (restore) cudaSetDevice(previous);
  delete s;
}
}  // namespace

Context::Context(Device d) : device(d) {
  if (d != Device::cuda) return;
  cuda = new CudaState;
  try {
    CUDA_CHECK(cudaGetDevice(&cuda->device));
    CUDA_CHECK(cudaStreamCreate(&cuda->stream));
    cuda->matmul = std::make_unique<cuda::MatmulContext>(kMatmulWorkspaceBytes, kMatmulBiasColumns);
    // reduce_result [0], partials [1, 1 + kSumSquaresBlocks): one allocation
    CUDA_CHECK(cudaMalloc(&cuda->reduce_result, sizeof(double) * (1 + cuda::kSumSquaresBlocks)));
    cuda->reduce_partials = cuda->reduce_result + 1;
    CUDA_CHECK(cudaMallocHost(&cuda->reduce_host, sizeof(double)));
  } catch (...) {
    release(cuda);
    cuda = nullptr;
    throw;
  }
}

Context::~Context() {
  if (!cuda) return;
  release(cuda);
  cuda = nullptr;
}

void* Context::stream() const { return cuda ? cuda->stream : nullptr; }

}  // namespace ulysses::ops
