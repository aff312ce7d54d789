// The GPT-2 model (optionally with rotary positions and grouped-query attention), written for
// one rank of a DP × SP layout: it holds T = N/P tokens of each sequence outside attention and,
// with P > 1, runs attention on all N tokens for its share of the heads between the two
// Ulysses all-to-alls (comm/ulysses.h). forward() and backward() are explicit op sequences in
// the order of the architecture; they allocate nothing (the arenas are laid out up front:
// parameters, gradients, activations).
//
// Parameters live in one contiguous buffer in llm.c's order, so an llm.c checkpoint is a memcpy:
//   wte [Vp, C], wpe [maxT, C] (0 rows with rope), ln1w [L, C], ln1b [L, C],
//   qkvw [L, (Hq + 2 Hkv) d, C], qkvb [L, (Hq + 2 Hkv) d], attprojw [L, C, C], attprojb [L, C],
//   ln2w [L, C], ln2b [L, C], fcw [L, 4C, C], fcb [L, 4C], fcprojw [L, C, 4C], fcprojb [L, C],
//   lnfw [C], lnfb [C]
//
// Devices and number formats (kernels/ops.h):
//   cpu   everything fp32 in host memory; params_flat() is what forward/backward read.
//   cuda  params_flat() / params_padded(): the fp32 MASTER weights, on the device (what the
//         optimizer updates and checkpoints hold); compute_params_padded(): a bf16 copy of the
//         padded buffer, same length, that forward/backward read (params() points into it);
//         refresh_compute_params() casts master -> compute (the optimizer's param_lowp output
//         does the same in its update). grads_flat() / grads_padded() / grads(): fp32 on the
//         device. Activations are bf16 except LayerNorm mean/rstd, attention lse and the losses
//         (fp32) and tokens / targets / positions (i32); the Ulysses scratch is bf16.
//         Every op is enqueued on context().stream(); the host waits once per micro-batch (the
//         loss sum, see forward_backward) and at the end of forward_logits and init_weights.
//         With runtime.offload = checkpoints (GPTRunShape::offload_checkpoints) the layer
//         outputs' copies to and from pinned host memory run on a second stream of the model's,
//         ordered against context().stream() by events only (no host wait; see kCheckpointSlots).
// A model built with shared_params shares the master and the compute buffers of the other.
//
// Implemented in core/gpt.cpp (forward and backward), core/gpt_params.cpp (parameters, init),
// core/gpt_layout.cpp (the constructor, the activation arena) and core/gpt_offload.cpp (pinned
// staging, offloaded checkpoints), around the private structs of core/gpt_internal.h.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/ulysses.h"
#include "core/base/arena.h"
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

// The 12 parameter (or gradient) tensors of one layer: ParameterTensors 2..13 without the
// leading [L], in llm.c order. The model's layer ops read their weights only through these.
constexpr int kFirstLayerTensor = 2, kNumLayerTensors = 12;
struct LayerTensors {
  std::array<Tensor, kNumLayerTensors> t;
  Tensor& ln1w() { return t[0]; }
  Tensor& ln1b() { return t[1]; }
  Tensor& qkvw() { return t[2]; }
  Tensor& qkvb() { return t[3]; }
  Tensor& attprojw() { return t[4]; }
  Tensor& attprojb() { return t[5]; }
  Tensor& ln2w() { return t[6]; }
  Tensor& ln2b() { return t[7]; }
  Tensor& fcw() { return t[8]; }
  Tensor& fcb() { return t[9]; }
  Tensor& fcprojw() { return t[10]; }
  Tensor& fcprojb() { return t[11]; }
};

// GPT-2 init, as a stream: every parameter's initial value, tensor by tensor in llm.c order and
// element by element, handed to sink(tensor index, first element, values, count) in consecutive
// chunks. N(0, init_std) for wte, wpe, qkvw, fcw; N(0, init_std / sqrt(2L)) for the residual
// projections attprojw, fcprojw; LayerNorm weights 1; biases and LayerNorm biases 0. Box-Muller
// on mt19937_64 by hand (std::normal_distribution is implementation-defined), so the values are
// the same on every rank and platform, and whoever holds a shard (core/zero3.h) can keep just it.
void parameter_init_values(const GPTShape& s, double init_std, uint64_t seed,
                           const std::function<void(int tensor, int64_t begin, const float* values, int64_t n)>& sink);

// Called by GPT::forward() / backward() at the layer boundaries when set (GPT::set_layer_hooks):
// ZeRO 2 and 3 (core/zero3.h) hold what the model then does not, and move it per layer.
class LayerHooks {
 public:
  virtual ~LayerHooks() = default;
  // before layer l's forward (not before the forward that full recompute reruns inside backward)
  virtual void before_forward(int l) = 0;
  // before layer l's backward (and the recomputed forward in it); layers run L-1 down to 0
  virtual void before_backward(int l) = 0;
  // layer l's gradients are complete
  virtual void after_backward(int l) = 0;
  // views of layer l's parameters / gradients; asked only when GPTRunShape::sharded_layer_params
  // / sharded_layer_grads say the model does not hold them, and only between the calls above
  virtual LayerTensors layer_params(int l) = 0;
  virtual LayerTensors layer_grads(int l) = 0;
};

// runtime.recompute: what backward recomputes instead of reading from the activation arena.
//   none       every activation of every layer is stored
//   selective  the LayerNorm outputs and the GELU output share one buffer across layers and are
//              recomputed in backward (the GELU with the MLP's first GEMM, whose epilogue makes it)
//   full       only each layer's output (the residual stream) is stored per layer; backward
//              re-runs the layer's forward into one shared layer workspace
enum class Recompute : uint8_t { none, selective, full };
Recompute parse_recompute(const std::string& name);  // UserError for an unknown name
const char* recompute_name(Recompute r);

// runtime.offload = checkpoints (full recompute on cuda): the layer outputs that full recompute
// stores ("checkpoints", residual3 [B*T, C] bf16) live in pinned host memory; the device keeps
// kCheckpointSlots rotating slots, layer l's output in slot l % kCheckpointSlots. The top
// kCheckpointSlots layers' outputs are still in their slots when backward starts, so only layers
// l < L - kCheckpointSlots are copied out (forward) and back (backward), on a second stream.
constexpr int kCheckpointSlots = 3;
inline int offloaded_checkpoint_layers(int L) { return std::max(0, L - kCheckpointSlots); }

struct GPTRunShape {
  int B = 1;           // sequences per micro-batch
  int N = 1;           // full sequence length
  int P = 1;           // sequence-parallel degree (real, or emulated with an emulated communicator)
  int tile_tokens = 0; // rows per chunk of the MLP and of the LM head (0: MLP untiled, LM head 256)
  Recompute recompute = Recompute::none;
  int flat_multiple = 1;  // parameter / gradient buffers padded (with zeros) to a multiple of this
  // ZeRO 2 / 3 (core/zero3.h): the model does not store the 12 per-layer tensors' gradients
  // (sharded_layer_grads) or parameters and gradients (sharded_layer_params, implies the former);
  // its flat buffers then hold only wte, wpe, lnfw, lnfb, contiguous in that order, and the layer
  // views come from the LayerHooks.
  bool sharded_layer_params = false;
  bool sharded_layer_grads = false;
  // cuda only: false = the model allocates no fp32 master weights of its own, only the bf16
  // compute copy. For ZeRO 2 / 3 on cuda, where LayerShardedZero keeps the master weights as
  // shards (at ZeRO 2 a whole fp32 copy would be 4 bytes per parameter that nothing reads).
  // params_flat() / params_padded() are then empty, init_weights is refused (LayerShardedZero
  // initialises) and refresh_compute_params does nothing (the optimizer writes the compute copy).
  // Ignored on cpu, where the one fp32 buffer is both master and compute copy.
  bool master_weights = true;
  // runtime.offload = checkpoints (see kCheckpointSlots); needs recompute full and Device::cuda
  bool offload_checkpoints = false;
  // runtime.all_to_all_chunks: the Ulysses all-to-alls in this many chunks of tokens per batch row,
  // pipelined with the GEMMs beside them (comm/ulysses.h); 1: whole. No effect at P = 1.
  int all_to_all_chunks = 1;
  int T() const { return N / P; }
  int64_t rows() const { return int64_t(B) * T(); }
  // rows per MLP chunk (all rows when untiled) and per LM-head chunk
  int64_t mlp_chunk() const { return tile_tokens > 0 ? std::min<int64_t>(tile_tokens, rows()) : rows(); }
  int64_t lm_head_chunk() const { return std::min<int64_t>(rows(), tile_tokens > 0 ? tile_tokens : 256); }
  bool mlp_tiled() const { return mlp_chunk() < rows(); }
};

// One buffer of the activation arena, as GPT lays it out (see GPT::activation_layout).
//   kind: inputs | layer (stored per layer) | attention_stats (per layer: softmax lse, LayerNorm
//   mean/rstd) | recompute (one shared layer workspace) | checkpoint_slots (offloaded
//   checkpoints: the device slots) | comm (Ulysses send/recv, local qkv) | backward (activation
//   gradients) | lm_head (final LayerNorm, losses, logits chunk)
struct ActivationBuffer {
  std::string name;
  std::string kind;
  int layer = -1;  // -1: not per layer
  std::vector<int64_t> dims;
  DType dtype = DType::f32;
  size_t bytes = 0;  // as reserved in the arena (aligned)
};

// FLOPs the model's matmuls and attention performed since reset (model FLOPs: recomputation in
// backward is not counted). Matmul [M, IC] x [IC, OC]: 2 M IC OC forward, 2 M IC OC more for each
// of dinp and dweight. Causal attention: 2 B h N^2 d forward (half of QK^T + PV over the square),
// twice that backward, so the totals follow flops_per_token(causal_halved = true).
struct OpCounts {
  uint64_t matmul_flops = 0, attention_flops = 0;
  uint64_t flops() const { return matmul_flops + attention_flops; }
};

class GPT {
 public:
  // seq: the sequence-parallel communicator (null or size 1 when P == 1). `shared_params`
  // (optional) makes this instance use another model's parameters (e.g. a P = 1 sampler beside
  // an SP training model); then it has no gradients.
  GPT(const ModelConfig& cfg, GPTRunShape run, Device device, Communicator* seq, GPT* shared_params = nullptr);
  ~GPT();

  // GPT-2 init: N(0, init_std), residual projections (attprojw, fcprojw) scaled by 1/sqrt(2L),
  // LayerNorm weights 1, biases 0; identical on every rank for the same seed, and the same fp32
  // values on both devices (generated on the host; on cuda copied to the master weights, then
  // the compute copy is refreshed; returns after the copy has finished).
  void init_weights(uint64_t seed);

  // One micro-batch: tokens, targets, positions are this rank's [B, T] (host int32; targets < 0
  // are ignored), checked on the host (UserError) before anything runs. Runs forward, the fused
  // LM head + cross-entropy, and backward; gradients ACCUMULATE as the gradient of the SUM of the
  // losses (normalise at the optimizer). Returns the sum of this rank's losses (host double);
  // *count gets the number of valid targets. On cuda the inputs go to the device through a
  // pinned host buffer (asynchronous copies), the whole micro-batch is enqueued, and then the
  // host waits for it once: ops::sum of the losses is the micro-batch's one synchronisation.
  double forward_backward(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count);
  // Forward and loss only (validation); the same single synchronisation.
  double forward_loss(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count);
  // Forward on tokens [B, T] and the logits [Vp] of row `row` (b * T + t) into `logits` (host
  // fp32; on cuda the bf16 row is cast to fp32 on the device, copied back, and waited for).
  void forward_logits(const int32_t* tokens, const int32_t* positions, int64_t row, float* logits);
  // Forward on tokens [B, T] and the logits of every row, [B * T, Vp] host fp32 (`ulysses dump`).
  void forward_all_logits(const int32_t* tokens, const int32_t* positions, float* logits);

  void zero_grad();

  const GPTShape& shape() const { return shape_; }
  const GPTRunShape& run_shape() const { return run_; }
  double init_std() const { return init_std_; }  // model.init_std (see parameter_init_values)
  // The tensors this model stores (with sharded layers: the per-layer ones have no data).
  ParameterTensors& params() { return params_; }
  ParameterTensors& grads() { return grads_; }
  Device device() const { return device_; }
  // All parameters in llm.c order, fp32 (the master weights on cuda); with sharded layers only
  // wte, wpe, lnfw, lnfb (GPTRunShape); empty on cuda without master_weights.
  Tensor params_flat() const { return params_flat_; }
  Tensor grads_flat() const { return grads_flat_; }  // fp32
  // Layer l's parameters / gradients: slices of the stacked tensors, or the hooks' views (on
  // cuda the parameters are bf16 compute views, the gradients fp32).
  LayerTensors layer_params(int l);
  LayerTensors layer_grads(int l);
  // Not owned; null to clear. Must outlive its use by forward / backward.
  void set_layer_hooks(LayerHooks* hooks) { hooks_ = hooks; }
  // The same buffers with their zero padding to run.flat_multiple (ZeRO shards them evenly).
  Tensor params_padded() const { return params_padded_; }
  Tensor grads_padded() const { return grads_padded_; }
  // What forward/backward read: bf16 [n_padded] on cuda, params_padded() itself on cpu.
  Tensor compute_params_padded() const { return compute_padded_; }
  // compute <- master (ops::cast, enqueued on context(); a no-op on cpu and on cuda without
  // master_weights). Call it after writing the master weights by any path other than an AdamW
  // update with param_lowp.
  void refresh_compute_params();
  // The ops context whose stream runs this model's kernels; the constructor also sets it as the
  // stream of the sequence communicator (seq->set_stream(ctx.stream())).
  ops::Context& context() { return ctx_; }
  size_t activation_bytes() const;
  // runtime.offload = checkpoints: the pinned host memory the offloaded layer outputs live in (0 without)
  size_t offloaded_checkpoint_bytes() const;
  UlyssesAllToAll* ulysses() { return ulysses_.get(); }  // null when P == 1
  OpCounts& op_counts() { return op_counts_; }

  // The activation arena of a rank with hq / hkv local heads (Hq, Hkv when P == 1) and Ulysses
  // scratch of `sp_scratch_elements` (UlyssesAllToAll::scratch_elements(); 0 when P == 1) on
  // `device` (its dtypes: see the top of this file), computed by the same code the constructor
  // allocates with, without allocating.
  static std::vector<ActivationBuffer> activation_layout(const GPTShape& s, const GPTRunShape& run, int hq, int hkv,
                                                         size_t sp_scratch_elements, Device device);

  // What the CUDA kernels need of the shape, as UserErrors naming the keys: model.n_embd and the
  // qkv width (n_head + 2 n_kv_head) * head_dim multiples of 8 (16-byte rows for cuBLASLt and the
  // vector loads), a head_dim that cuDNN's SDPA takes (a multiple of 8, at most 128) and, unless
  // cudnn_attention (runtime.attention: cudnn), a head_dim of 64 or 128 (the handwritten flash
  // kernels). The constructor checks all but the last on cuda, forward the last (the attention
  // choice is set on context() after construction); the trainer may call it whole before
  // building anything.
  static void check_cuda_shape(const ModelConfig& m, bool cudnn_attention);

 private:
  struct Layer;        // saved activations of one block
  struct Activations;  // every view into the activation arena
  struct HostStaging;  // pinned host buffer for the input copies (cuda)
  struct CheckpointOffload;  // runtime.offload = checkpoints: pinned host copies, stream, events
  struct ActivationPlanner;  // one lay_out call: reserves the views in the arena, in order
  // the constructor's steps (core/gpt_params.cpp, core/gpt_layout.cpp)
  void allocate_parameters(GPT* shared_params);  // parameter, compute-copy and gradient arenas
  void set_up_ulysses();                         // the all-to-alls and this rank's heads
  void allocate_activations();                   // the activation arena, from lay_out
  static void lay_out(const GPTShape& s, const GPTRunShape& run, int hq, int hkv, size_t sp_scratch, Device device,
                      Activations& A, Arena& arena, std::vector<ActivationBuffer>* list,
                      std::vector<std::pair<Tensor*, size_t>>* slots);
  // Host checks of a micro-batch's inputs (UserError); returns the number of valid targets.
  int64_t check_inputs(const int32_t* tokens, const int32_t* targets, const int32_t* positions) const;
  // host int32 [B*T] -> the activation tensor dst (through the pinned staging slot on cuda)
  void upload_input(Tensor dst, const int32_t* host, int slot);
  // offload: copy the checkpoints out for backward (runtime.offload; forward_backward only)
  void forward(const int32_t* tokens, const int32_t* positions, bool offload = false);
  // After forward: the logits [Vp] of row `row` into host fp32 `logits` (waits for the device).
  void logits_of_row(int64_t row, float* logits);
  void block_forward(Layer& a, int l, Tensor x, bool recompute);
  void mlp_forward(Layer& a, int l);
  void mlp_backward(Layer& a, int l);
  void classifier(const int32_t* targets, bool backward);
  void backward();
  void attention_forward(Layer& a, int l);
  void attention_backward(Layer& a, int l, Tensor dres);
  // the op calls that do FLOPs go through these, which count them (see OpCounts)
  void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias);
  void matmul_gelu_forward(Tensor out_gelu, Tensor pre_gelu, Tensor inp, Tensor weight, Tensor bias);
  void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight);

  GPTShape shape_;
  double init_std_ = 0.02;
  GPTRunShape run_;
  Device device_;
  ops::Context ctx_;
  Communicator* seq_ = nullptr;
  std::unique_ptr<UlyssesAllToAll> ulysses_;
  int hq_ = 0, hkv_ = 0;  // this rank's heads inside attention (Hq, Hkv when P == 1)
  OpCounts op_counts_;
  bool counting_ = true;  // false while backward recomputes forward ops

  Arena param_arena_, compute_arena_, grad_arena_, act_arena_;
  Tensor params_flat_, grads_flat_, params_padded_, grads_padded_;
  Tensor compute_padded_;  // bf16 [n_padded] on cuda; params_padded_ on cpu
  ParameterTensors params_, grads_;  // params_: views of the compute buffer; grads_: fp32
  std::unique_ptr<Activations> act_;
  std::unique_ptr<HostStaging> staging_;  // cuda only
  // runtime.offload = checkpoints only; declared after act_arena_ so that it is destroyed first
  // (its destructor waits for its copies, which touch the arena's slots)
  std::unique_ptr<CheckpointOffload> offload_;
  LayerHooks* hooks_ = nullptr;
};

}  // namespace ulysses
