// Attention entry points: argument checks, dispatch on the head dimension to the instantiations
// in attention_{fwd,bwd}_d{64,128}.cu, and the backward's preprocessing
//   dvec[b, h, t] = sum_i dout[b, t, h, i] * out[b, t, h, i]     (fp32, one warp per row).
#include <string>

#include "kernels/cuda/cuda_common.cuh"

namespace ulysses::cuda::attention {
// Defined (explicitly instantiated) in the per-head-dimension files.
template <int D>
void attention_forward_launch(bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv,
                              cudaStream_t stream);
extern template void attention_forward_launch<64>(bf16*, float*, const bf16*, int, int, int, int, cudaStream_t);
extern template void attention_forward_launch<128>(bf16*, float*, const bf16*, int, int, int, int, cudaStream_t);
template <int D>
void attention_backward_launch(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                               const float* dvec, int B, int N, int Hq, int Hkv, cudaStream_t stream);
extern template void attention_backward_launch<64>(bf16*, const bf16*, const bf16*, const float*, const float*,
                                                   int, int, int, int, cudaStream_t);
extern template void attention_backward_launch<128>(bf16*, const bf16*, const bf16*, const float*, const float*,
                                                    int, int, int, int, cudaStream_t);
}  // namespace ulysses::cuda::attention

namespace ulysses::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// rows are ordered (b, t, h) as in out; dvec is [B, Hq, N].
__global__ void attention_dvec_kernel(float* dvec, const bf16* dout, const bf16* out, int N, int Hq, int d,
                                      int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const bf16* g = dout + row * d;
  const bf16* o = out + row * d;
  float acc = 0.0f;
  for (int i = lane; i < d; i += 32) acc += __bfloat162float(g[i]) * __bfloat162float(o[i]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const int h = int(row % Hq);
    const int64_t bt = row / Hq;
    const int t = int(bt % N);
    const int64_t b = bt / N;
    dvec[(b * Hq + h) * N + t] = acc;
  }
}

void check_args(const char* op, int B, int N, int Hq, int Hkv, int d, const void* qkv) {
  std::string why;
  if (d != 64 && d != 128) why = "head dimension " + std::to_string(d) + " (supported: 64, 128)";
  else if (Hkv <= 0 || Hq % Hkv != 0) why = "Hq=" + std::to_string(Hq) + " not a multiple of Hkv=" + std::to_string(Hkv);
  else if (!is_aligned16(qkv)) why = "qkv not 16-byte aligned";
  else if (B < 0 || N < 0) why = "negative B or N";
  if (!why.empty()) cuda_check_fail(__FILE__, __LINE__, op, why.c_str());
}

}  // namespace

void attention_forward(bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv, int d,
                       cudaStream_t stream) {
  check_args("attention_forward", B, N, Hq, Hkv, d, qkv);
  if (B == 0 || N == 0 || Hq == 0) return;
  if (d == 64) attention::attention_forward_launch<64>(out, lse, qkv, B, N, Hq, Hkv, stream);
  else attention::attention_forward_launch<128>(out, lse, qkv, B, N, Hq, Hkv, stream);
}

size_t attention_backward_scratch_bytes(int B, int N, int Hq) { return sizeof(float) * size_t(B) * N * Hq; }

void attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out,
                        const float* lse, int B, int N, int Hq, int Hkv, int d, void* scratch,
                        size_t scratch_bytes, cudaStream_t stream) {
  check_args("attention_backward", B, N, Hq, Hkv, d, qkv);
  if (!is_aligned16(dout) || !is_aligned16(dqkv))
    cuda_check_fail(__FILE__, __LINE__, "attention_backward", "dout or dqkv not 16-byte aligned");
  if (scratch_bytes < attention_backward_scratch_bytes(B, N, Hq))
    cuda_check_fail(__FILE__, __LINE__, "attention_backward", "scratch smaller than attention_backward_scratch_bytes()");
  if (B == 0 || N == 0 || Hq == 0) return;
  float* dvec = static_cast<float*>(scratch);
  const int64_t rows = int64_t(B) * N * Hq;
  attention_dvec_kernel<<<grid_for(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(dvec, dout, out, N, Hq,
                                                                                             d, rows);
  CUDA_CHECK_LAUNCH("attention_dvec_kernel");
  if (d == 64) attention::attention_backward_launch<64>(dqkv, dout, qkv, lse, dvec, B, N, Hq, Hkv, stream);
  else attention::attention_backward_launch<128>(dqkv, dout, qkv, lse, dvec, B, N, Hq, Hkv, stream);
}

}  // namespace ulysses::cuda
