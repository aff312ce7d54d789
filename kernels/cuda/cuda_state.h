// The CUDA side of ops::Context (kernels/ops.h): what the op dispatch in kernels/ops.cpp needs to
// enqueue kernels. Created by Context(Device::cuda) on the CUDA device current at the time
// (kernels/cuda/context.cpp); every op of that context runs on `stream`, on that device.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/cuda_ops.h"

namespace ulysses::ops {

struct CudaState {
  int device = 0;                 // the CUDA device current at construction
  // A blocking stream: it waits for work on the legacy default stream (a plain cudaMemcpy or
  // cudaMemset issued elsewhere, e.g. when loading a checkpoint) and vice versa, so such calls
  // need no extra synchronisation with the ops.
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::MatmulContext> matmul;

  // One growable device scratch buffer, shared by the ops that need scratch (layernorm and
  // matmul bias column sums, attention backward, embedding backward). Returns at least `bytes`
  // bytes, valid for work enqueued on `stream` until the next scratch() call. Grows only when a
  // larger size is asked for (the first step), stream-ordered: cudaFreeAsync of the old buffer
  // and cudaMallocAsync of the new one on `stream`, so work already enqueued on the old buffer
  // finishes first and the host never waits. Never shrinks.
  void* scratch(size_t bytes);
  void* scratch_ptr = nullptr;
  size_t scratch_bytes = 0;

  // sum() and sum_squares(): the device result, the reduction's partials
  // (cuda::kSumSquaresBlocks doubles) and the pinned host copy the result is read from.
  double* reduce_result = nullptr;    // device, 1 double
  double* reduce_partials = nullptr;  // device, cuda::kSumSquaresBlocks doubles
  double* reduce_host = nullptr;      // pinned host, 1 double

  // cuDNN SDPA (ctx.cudnn_attention = true): made on first use (it creates a cuDNN handle and
  // builds plans per shape), on this state's device.
  std::unique_ptr<cuda::CudnnAttention> cudnn_attention;
};

}  // namespace ulysses::ops
