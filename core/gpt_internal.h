// GPT's private structs, shared by the files that implement core/gpt.h (not for other callers):
//   GPT::Layer              the saved activations of one block
//   GPT::Activations        every view into the activation arena
//   GPT::ActivationPlanner  reserves those views in the arena, in order (core/gpt_layout.cpp)
//   GPT::HostStaging        pinned host rows for the input copies (cuda; core/gpt_offload.cpp)
//   GPT::CheckpointOffload  runtime.offload = checkpoints (cuda; core/gpt_offload.cpp)
// and zero_arena, which every arena of the model is zeroed with. Who defines what:
//   core/gpt.cpp          the block's forward and backward, the LM head, the entry points
//   core/gpt_params.cpp   shapes, parameter specs and views, FLOP counts, GPT-2 init
//   core/gpt_layout.cpp   the constructor, the activation arena's layout per recompute mode
//   core/gpt_offload.cpp  the pinned input staging and the offloaded checkpoints
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "core/gpt.h"
#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>
#endif

namespace ulysses {

struct GPT::Layer {
  Tensor ln1, ln1_mean, ln1_rstd;   // [B*T, C], [B*T], [B*T]
  Tensor qkv_full;                  // [B, N, hq+2hkv, d]   (P = 1: the local qkv)
  Tensor att_full, lse;             // [B, N, hq, d], [B, hq, N]
  Tensor att;                       // [B*T, C]             (P = 1: att_full's memory)
  Tensor residual2;                 // [B*T, C]
  Tensor ln2, ln2_mean, ln2_rstd;   // [B*T, C], [B*T], [B*T]
  Tensor fch, fch_gelu;             // [B*T, 4C], or [chunk, 4C] when the MLP is tiled
  Tensor residual3;                 // [B*T, C]  the block's output
};

// dtypes: the activation dtype (f32 on cpu, bf16 on cuda) unless marked; LayerNorm mean / rstd
// and lse f32 on both.
struct GPT::Activations {
  Tensor tokens, targets, positions;     // [B*T] i32
  Tensor encoded;                        // [B*T, C]
  std::vector<Layer> layers;             // fields not stored per layer alias `work` / `ln_work`
  Layer work;                            // full recompute: the one layer workspace
  Tensor ln_work;                        // selective: LayerNorm outputs of every layer, [B*T, C]
  Tensor lnf, lnf_mean, lnf_rstd;        // [B*T, C], [B*T], [B*T]
  Tensor losses;                         // [B*T] f32
  Tensor logits;                         // [lm_head_chunk, Vp]
  Tensor logits_row;                     // [Vp] f32, cuda only: forward_logits' row cast to fp32
  // scratch
  Tensor qkv_local, dqkv_local;          // [B, T, Hq+2Hkv, d] (P > 1)
  Tensor dqkv_full, datt_full;           // [B, N, hq+2hkv, d], [B, N, hq, d]
  Tensor dres, dlnf, dln, datt;          // [B*T, C]
  Tensor dfch_gelu, dfch;                // [mlp_chunk, 4C]
  Tensor sp_send, sp_recv;
  // runtime.offload = checkpoints: the device slots the layer outputs rotate through,
  // min(L, kCheckpointSlots) x [B*T, C]; layer l's residual3 is slot l % that
  std::array<Tensor, kCheckpointSlots> checkpoint_slots;
  int num_checkpoint_slots = 0;
};

// One GPT::lay_out call: the shape it lays out for and the arena it reserves in. want() reserves
// one buffer (in call order, so the order of the want() calls is the arena's order), gives the
// view its shape and dtype, records the (view, offset) pair the constructor turns into a tensor
// (`slots`) and the description the memory estimate reads (`list`); either may be null.
struct GPT::ActivationPlanner {
  const GPTShape& s;
  const GPTRunShape& run;
  int hq, hkv;        // this rank's heads inside attention
  size_t sp_scratch;  // Ulysses send / receive elements (0 when P == 1)
  Device device;
  Arena& arena;
  std::vector<ActivationBuffer>* list;
  std::vector<std::pair<Tensor*, size_t>>* slots;

  void want(Tensor& t, const char* name, const char* kind, int layer, std::initializer_list<int64_t> dims, DType dt);
  // act: activations, their gradients and the all-to-all scratch (bf16 on cuda, f32 on cpu)
  DType act() const { return device == Device::cuda ? DType::bf16 : DType::f32; }
  // fch and fch_gelu [chunk, 4C] are one buffer shared by the layers (see shared_workspace)
  bool shared_mlp() const { return run.recompute != Recompute::none || run.mlp_tiled(); }

  // lay_out's steps, in the arena's order
  void inputs(Activations& A);            // tokens, targets, positions, the embedding output
  void shared_workspace(Activations& A);  // what the layers share under recompute / tiling
  void layer(Activations& A, int l);      // what layer l stores itself
  void lm_head(Activations& A);           // the final LayerNorm, losses, logits chunk
  void scratch(Activations& A);           // the Ulysses buffers and the activation gradients
};

// Page-locked host memory for the three int32 input rows [3, B*T] (tokens, targets, positions),
// so their host -> device copies are asynchronous. Allocated once, in the constructor. A slot is
// rewritten only by the next micro-batch, which starts after the previous one's loss sum has
// synchronised the stream (so the previous copy out of it has finished).
struct GPT::HostStaging {
  int32_t* data = nullptr;
  int64_t row = 0;  // B*T
  explicit HostStaging(int64_t rows);
  ~HostStaging();
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  Tensor slot(int i) const { return Tensor(data + i * row, {row}, DType::i32, Device::cpu); }
};

// runtime.offload = checkpoints: layer l's output (residual3 [B*T, C] bf16, `layer_bytes`) lives
// in device slot l % 3 (Activations::checkpoint_slots); layers l < L - 3 ("offloaded") are copied
// to host[l] in forward and back in backward, on this struct's own stream. The schedule of the
// copies and events is at the top of core/gpt_offload.cpp. Everything here is created once; a
// step only records and waits on events (no allocation, no host wait).
struct GPT::CheckpointOffload {
  int L = 0;
  size_t layer_bytes = 0;
  char* host = nullptr;  // pinned [offloaded_checkpoint_layers(L), B*T, C] bf16
#ifdef ULYSSES_CUDA
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;            // model stream -> copy stream, re-recorded before each copy
  std::vector<cudaEvent_t> out, in;       // per offloaded layer: its D2H / H2D copy is done
#endif

  CheckpointOffload(int layers, size_t bytes_per_layer);
  ~CheckpointOffload() { release(); }
  CheckpointOffload(const CheckpointOffload&) = delete;
  CheckpointOffload& operator=(const CheckpointOffload&) = delete;

  // not checked: called from the destructor and on the constructor's error path
  void release();

  bool offloaded(int l) const { return l >= 0 && l < offloaded_checkpoint_layers(L); }

#ifdef ULYSSES_CUDA
  // the copy stream starts only after what `model` has enqueued so far
  void follow(cudaStream_t model);
#endif

  // model: the model's stream (a cudaStream_t)
  void before_forward(int l, void* model);
  // slot: layer l's output, complete once what `model` has enqueued has run
  void after_forward(int l, void* model, const Tensor& slot);
  // slot_below: the slot layer l - 2's output goes to (slot (l - 2) % 3)
  void before_backward(int l, void* model, const Tensor& slot_below);
};

// Zeroes an allocated arena on the context's stream. The arenas are allocated unzeroed and
// zeroed here because Arena::zero's cudaMemset runs on the legacy default stream, which the
// model's non-blocking stream does not wait for. (core/gpt_layout.cpp)
void zero_arena(ops::Context& ctx, const Arena& arena);

}  // namespace ulysses
