// The GPT-2 model (optionally with rotary positions and grouped-query attention), written for
// one rank of a DP × SP layout: it holds T = N/P tokens of each sequence outside attention and,
// with P > 1, runs attention on all N tokens for its share of the heads between the two
// Ulysses all-to-alls (comm/ulysses.h). forward() and backward() are explicit op sequences in
// the order of the architecture; they allocate nothing (four arenas are laid out up front:
// parameters, gradients, activations, scratch).
//
// Parameters live in one contiguous buffer in llm.c's order, so an llm.c checkpoint is a memcpy:
//   wte [Vp, C], wpe [maxT, C] (0 rows with rope), ln1w [L, C], ln1b [L, C],
//   qkvw [L, (Hq + 2 Hkv) d, C], qkvb [L, (Hq + 2 Hkv) d], attprojw [L, C, C], attprojb [L, C],
//   ln2w [L, C], ln2b [L, C], fcw [L, 4C, C], fcb [L, 4C], fcprojw [L, C, 4C], fcprojb [L, C],
//   lnfw [C], lnfb [C]
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/ulysses.h"
#include "core/arena.h"
#include "core/config.h"
#include "kernels/ops.h"

namespace ulysses {

struct GPTShape {
  int L = 0, C = 0, Hq = 0, Hkv = 0, d = 0, V = 0, Vp = 0, maxT = 0;
  bool rope = false;
  float rope_theta = 10000.f;
  int qkv_heads() const { return Hq + 2 * Hkv; }
  static GPTShape from(const ModelConfig& m);
};

constexpr int kNumParameterTensors = 16;
struct ParameterSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool weight_decay;  // matrices and embeddings decay; biases and LayerNorm do not
  int64_t numel() const;
};
// The 16 tensors in llm.c order.
std::vector<ParameterSpec> parameter_specs(const GPTShape& s);
int64_t num_parameters(const GPTShape& s);
// Non-embedding parameters counted for FLOPs: 6 * this per token (plus attention), see docs.
int64_t flops_per_token(const GPTShape& s, int N, bool causal_halved);

struct ParameterTensors {
  std::array<Tensor, kNumParameterTensors> t;
  Tensor& wte() { return t[0]; }
  Tensor& wpe() { return t[1]; }
  Tensor& ln1w() { return t[2]; }
  Tensor& ln1b() { return t[3]; }
  Tensor& qkvw() { return t[4]; }
  Tensor& qkvb() { return t[5]; }
  Tensor& attprojw() { return t[6]; }
  Tensor& attprojb() { return t[7]; }
  Tensor& ln2w() { return t[8]; }
  Tensor& ln2b() { return t[9]; }
  Tensor& fcw() { return t[10]; }
  Tensor& fcb() { return t[11]; }
  Tensor& fcprojw() { return t[12]; }
  Tensor& fcprojb() { return t[13]; }
  Tensor& lnfw() { return t[14]; }
  Tensor& lnfb() { return t[15]; }
};

// Layer l's slice of a stacked [L, ...] parameter tensor.
Tensor layer_slice(const Tensor& stacked, int l);

struct GPTRunShape {
  int B = 1;           // sequences per micro-batch
  int N = 1;           // full sequence length
  int P = 1;           // sequence-parallel degree
  int tile_tokens = 0; // rows per chunk of the LM head (0: a default of 256)
  int T() const { return N / P; }
};

class GPT {
 public:
  // seq: the sequence-parallel communicator (null or size 1 when P == 1). `shared_params`
  // (optional) makes this instance use another model's parameters (e.g. a P = 1 sampler beside
  // an SP training model); then it has no gradients.
  GPT(const ModelConfig& cfg, GPTRunShape run, Device device, Communicator* seq, GPT* shared_params = nullptr);
  ~GPT();

  // GPT-2 init: N(0, init_std), residual projections (attprojw, fcprojw) scaled by 1/sqrt(2L),
  // LayerNorm weights 1, biases 0; identical on every rank for the same seed.
  void init_weights(uint64_t seed);

  // One micro-batch: tokens, targets, positions are this rank's [B, T] (host int32; targets < 0
  // are ignored). Runs forward, the fused LM head + cross-entropy, and backward; gradients
  // ACCUMULATE as the gradient of the SUM of the losses (normalise at the optimizer).
  // Returns the sum of this rank's losses; *count gets the number of valid targets.
  double forward_backward(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count);
  // Forward and loss only (validation).
  double forward_loss(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count);
  // Forward on tokens [B, T] and the logits [Vp] of row `row` (b * T + t) into `logits` (host).
  void forward_logits(const int32_t* tokens, const int32_t* positions, int64_t row, float* logits);

  void zero_grad();

  const GPTShape& shape() const { return shape_; }
  const GPTRunShape& run_shape() const { return run_; }
  ParameterTensors& params() { return params_; }
  ParameterTensors& grads() { return grads_; }
  Tensor params_flat() const { return params_flat_; }  // all parameters, llm.c order
  Tensor grads_flat() const { return grads_flat_; }
  ops::Context& context() { return ctx_; }
  size_t activation_bytes() const;
  UlyssesAllToAll* ulysses() { return ulysses_.get(); }  // null when P == 1

 private:
  struct Layer;  // saved activations of one block
  void forward(const int32_t* tokens, const int32_t* positions);
  double classifier(const int32_t* targets, bool backward, int64_t* count);
  void backward();
  void attention_forward(Layer& a, int l);
  void attention_backward(Layer& a, int l, Tensor dres);

  GPTShape shape_;
  double init_std_ = 0.02;
  GPTRunShape run_;
  Device device_;
  ops::Context ctx_;
  Communicator* seq_ = nullptr;
  std::unique_ptr<UlyssesAllToAll> ulysses_;
  int hq_ = 0, hkv_ = 0;  // this rank's heads inside attention (Hq, Hkv when P == 1)

  Arena param_arena_, grad_arena_, act_arena_;
  Tensor params_flat_, grads_flat_;
  ParameterTensors params_, grads_;

  // activations (act_arena_)
  Tensor tokens_, targets_, positions_;     // [B*T] i32
  Tensor encoded_;                          // [B*T, C]
  std::vector<Layer> layers_;
  Tensor lnf_, lnf_mean_, lnf_rstd_;        // [B*T, C], [B*T], [B*T]
  Tensor losses_;                           // [B*T]
  Tensor logits_;                           // [chunk, Vp]
  // scratch
  Tensor qkv_local_, dqkv_local_;           // [B, T, Hq+2Hkv, d] (P > 1)
  Tensor dqkv_full_, datt_full_;            // [B, N, hq+2hkv, d], [B, N, hq, d]
  Tensor dres_, dlnf_, dln_, datt_;         // [B*T, C]
  Tensor dfch_gelu_, dfch_;                 // [B*T, 4C]
  Tensor sp_send_, sp_recv_;
};

}  // namespace ulysses
