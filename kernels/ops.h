// The op interface the model calls: one function per op, on Tensor views. The tensors' device
// picks the implementation (kernels/cpu/*.cpp, fp32 reference; kernels/cuda/*.cu, bf16), so the
// model code never asks which backend it runs on. Semantics, layouts and the gradient
// conventions (parameter and activation gradients accumulate, forward outputs overwrite) are
// those documented in kernels/cpu/cpu_ops.h; shapes are checked here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/base/tensor.h"

namespace ulysses::ops {

// Number formats by device (the dtype of each Tensor picks the kernel):
//   cpu:  everything fp32 (tokens, targets, positions i32).
//   cuda: weights and activations bf16 (and their gradients flowing through the model);
//         parameter gradients fp32; LayerNorm mean/rstd, attention lse, losses fp32;
//         optimizer master weights and moments fp32; tokens, targets, positions i32.
//
// Per-device execution state. cpu: a growable scratch (cpu_scratch). cuda: a stream created on
// the CUDA device current at construction, the cuBLASLt handle + workspace + heuristic cache
// (cuda::MatmulContext) and one growable scratch buffer for the ops that need scratch (grown
// only the first time a larger size is asked for, i.e. during the first step; never shrunk).
// Every op enqueues on the context's stream and returns without waiting, except those
// documented as syncing.
struct CudaState;  // defined by the CUDA side (kernels/cuda/context.cpp)
class Context {
 public:
  Context() = default;  // cpu
  explicit Context(Device device);
  ~Context();
  Context(Context&& o) noexcept;
  Context& operator=(Context&& o) noexcept;
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  Device device = Device::cpu;
  CudaState* cuda = nullptr;  // owned; null on cpu
  void* stream() const;       // the cudaStream_t ops are enqueued on (null on cpu)
  // runtime.attention on cuda: false = the handwritten flash kernels, true = cuDNN SDPA
  bool cudnn_attention = false;

  // cpu: the scratch of the ops that need one (attention), `floats` long: grown the first time a
  // larger size is asked for (the first step), never shrunk, so later steps do not allocate.
  // Valid until the next call.
  float* cpu_scratch(size_t floats);

 private:
  std::vector<float> cpu_scratch_;
};

// dst = src, same dtype and element count, any pair of devices (host <-> device copies are
// enqueued on ctx's stream; a host destination is valid only after synchronize(ctx)).
void copy(Context& ctx, Tensor dst, Tensor src);
// Waits until every op enqueued on ctx has finished (no-op on cpu).
void synchronize(Context& ctx);
// dst = src converted between f32 and bf16 (round to nearest even), same device, same numel.
void cast(Context& ctx, Tensor dst, Tensor src);
// Sum of an f32 tensor in double, in a fixed order (deterministic); syncs on cuda.
double sum(Context& ctx, Tensor x);

// out [R, C] = wte[tokens] + wpe[positions]; wpe empty with rotary positions. tokens, positions: [R]
void embedding_forward(Context& ctx, Tensor out, Tensor tokens, Tensor positions, Tensor wte, Tensor wpe);
void embedding_backward(Context& ctx, Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, Tensor positions);

// out, inp [R, C]; mean, rstd [R]; weight, bias [C]
void layernorm_forward(Context& ctx, Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias);
void layernorm_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd);

// out [M, OC] = inp [M, IC] · weight [OC, IC]^T + bias [OC] (bias may be empty)
void matmul_forward(Context& ctx, Tensor out, Tensor inp, Tensor weight, Tensor bias);
// dinp, dweight, dbias may be empty (not needed); all accumulate.
void matmul_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight);

// Fused forward ops: on cpu exactly the composition of the ops above that they replace (the same
// calls, so bitwise the same results); on cuda one kernel where the composition takes two.
//
// pre_gelu [M, OC] = inp [M, IC] · weight [OC, IC]^T + bias [OC] (bias may be empty) and
// out_gelu [M, OC] = gelu(pre_gelu): cpu matmul_forward then gelu_forward; cuda one cuBLASLt GEMM
// with the GELU_AUX(_BIAS) epilogue (cuBLASLt's own GELU in the epilogue; pre_gelu stored in bf16),
// so on cuda out_gelu may differ from gelu_forward(pre_gelu) by a bf16 rounding: a run must take
// its GELU outputs from this op alone, also where it recomputes them.
// gelu_backward(dinp, pre_gelu, dout) is its backward. out_gelu must not alias pre_gelu.
void matmul_gelu_forward(Context& ctx, Tensor out_gelu, Tensor pre_gelu, Tensor inp, Tensor weight, Tensor bias);
// residual_out [R, C] = a + b, then ln_out, mean, rstd = LayerNorm(residual_out; weight, bias): cpu
// residual_forward then layernorm_forward; cuda one pass (the sum rounded to bf16 first, then
// normalised exactly as layernorm_forward normalises the stored residual_out, so a later
// layernorm_forward of residual_out recomputes ln_out, mean, rstd bitwise). residual_out may
// alias a or b; ln_out must not alias residual_out. The backward is layernorm_backward with
// inp = residual_out, whose dinp is then the gradient of both a and b.
void residual_layernorm_forward(Context& ctx, Tensor residual_out, Tensor ln_out, Tensor mean, Tensor rstd, Tensor a,
                                Tensor b, Tensor weight, Tensor bias);

void gelu_forward(Context& ctx, Tensor out, Tensor inp);
void gelu_backward(Context& ctx, Tensor dinp, Tensor inp, Tensor dout);
void residual_forward(Context& ctx, Tensor out, Tensor a, Tensor b);

// x: the packed qkv [R, Htot, d]; rotates heads [head_begin, head_begin + n_heads) in place.
void rope_forward(Context& ctx, Tensor x, int head_begin, int n_heads, Tensor positions, float base);
void rope_backward(Context& ctx, Tensor dx, int head_begin, int n_heads, Tensor positions, float base);

// qkv [B, N, Hq + 2 Hkv, d] -> out [B, N, Hq, d], lse [B, Hq, N]; causal.
void attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv, int Hq, int Hkv);
void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor out, Tensor lse, int Hq, int Hkv);

// logits [R, Vp] (gradient in place), losses [R], targets [R]; V real columns.
void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets, int V, float grad_scale);

// param: the f32 (master) weights; param_lowp (optional, cuda): a bf16 copy written with the
// updated weights in the same pass.
void adamw_update(Context& ctx, Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float grad_scale, int t,
                  Tensor param_lowp = Tensor());
double sum_squares(Context& ctx, Tensor x);  // returns to the host (syncs on cuda)
void fill_zero(Context& ctx, Tensor x);      // memset 0 on the tensor's device

// Ulysses layout transforms (see cpu_ops.h). heads / head_offsets live on the tensors' device
// (host arrays for cpu, device arrays for cuda, e.g. made once by UlyssesAllToAll).
void ulysses_pack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P);
void ulysses_unpack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets,
                          int P, bool accumulate);
// The same on some token rows only: rows [t_begin, t_begin + t_count) of batch row b of the
// [B, T, Htot, d] tensor, moved to / from exactly the places the whole call uses (the rest of
// dst is left as it is). A set of calls whose rows cover every (b, t) once equals one whole call,
// bitwise. The chunked all-to-alls (comm/ulysses.h) pack and unpack one chunk at a time.
struct TokenRows {
  int b = 0, t_begin = 0, t_count = 0;
};
void ulysses_pack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets, int P,
                        TokenRows rows);
void ulysses_unpack_heads(Context& ctx, Tensor dst, Tensor src, const int32_t* heads, const int64_t* head_offsets,
                          int P, bool accumulate, TokenRows rows);
void ulysses_pack_sequence(Context& ctx, Tensor dst, Tensor src, int P);
void ulysses_unpack_sequence(Context& ctx, Tensor dst, Tensor src, int P);

}  // namespace ulysses::ops
