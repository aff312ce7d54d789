// Causal attention through cuDNN 9's fused scaled-dot-product attention (SDPA), written against
// the cuDNN backend (graph) API: runtime.attention = cudnn. Same semantics, layouts and
// conventions as the handwritten flash kernels (cuda::attention_forward / attention_backward in
// cuda_ops.h), so kernels/ops.cpp can pick either behind the same op:
//   qkv:  [B, N, Hq + 2*Hkv, d] bf16 (q heads, then k heads, then v heads); query head h uses
//         key/value head h / (Hq / Hkv) (GQA; Hq % Hkv == 0)
//   out:  [B, N, Hq, d] bf16
//   lse:  [B, Hq, N] fp32, natural-log logsumexp of each row of the scaled scores q·k / sqrt(d)
//         over the causal keys 0..t (cuDNN's softmax "stats" are exactly this: max + log(sum))
//   dqkv: layout of qkv, OVERWRITTEN; GQA's dK/dV are summed over each group inside cuDNN's graph.
// Q, K, V, dQ, dK, dV are described to cuDNN with strides over the packed buffer (no copies):
//   Q dims [B, Hq, N, d] strides [N*Htot*d, d, Htot*d, 1], K and V likewise at head offsets Hq
//   and Hq + Hkv (Htot = Hq + 2*Hkv); out and dout: [B, Hq, N, d] strides [N*Hq*d, d, Hq*d, 1].
// Requirements: d a multiple of 8 and at most 128 (cuDNN's backward limit on sm_80; sm_90 would
// allow 256), N >= 2 for the backward (cuDNN has no backward for a single key and query).
//
// Cost and state. The first call for a shape (B, N, Hq, Hkv, d) builds the operation graph, asks
// cuDNN's heuristics for engines, finalizes the first execution plan that works (this runs
// cuDNN's runtime compilation: a one-off host-side delay) and allocates that plan's device
// workspace with cudaMalloc; both are kept until destruction, so later calls of that shape
// allocate nothing on the device and do not synchronise. Each call creates and destroys one
// host-side variant-pack descriptor (the pointers differ per layer).
// Determinism: cuDNN's backward accumulates dQ with atomics, so dqkv is NOT bitwise repeatable
// (the flash kernels are); the forward is.
// One instance per device and thread; not thread-safe.
#pragma once
#include <cuda_runtime.h>

#include <memory>

#include "kernels/cuda/cuda_ops.h"  // bf16

namespace ulysses::cuda {

class CudnnAttention {  // owns a cudnnHandle_t and a cache of finalized plans per shape
 public:
  CudnnAttention();  // creates the cuDNN handle on the current device
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // qkv [B, N, Hq + 2 Hkv, d] bf16 (q heads, then k heads, then v heads, as the flash op);
  // out [B, N, Hq, d] bf16; lse [B, Hq, N] fp32 natural-log logsumexp of the scaled scores
  // (scale 1/sqrt(d)), causal. Same semantics as cuda::attention_forward in cuda_ops.h.
  void forward(bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv, int d,
               cudaStream_t stream);
  // dqkv OVERWRITTEN (layout of qkv), from dout, qkv, out, lse (as saved by forward).
  void backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                int B, int N, int Hq, int Hkv, int d, cudaStream_t stream);
  // the cuDNN library loaded at run time, as cudnnGetVersion() (9.19.0 -> 91900): the backward
  // of an N that is not a multiple of 128 needs 9.16 or later (a UserError before)
  size_t version() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace ulysses::cuda
