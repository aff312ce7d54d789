// GPT forward and backward for one rank of a DP × SP layout, on cpu (fp32) or cuda (bf16
// compute, fp32 master weights and gradients); see core/gpt.h.
#include "core/gpt.h"

#include <cmath>
#include <cstring>
#include <random>

#include "core/base/error.h"
#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#endif

namespace ulysses {

// ---- shapes and parameter layout --------------------------------------------------------------

GPTShape GPTShape::from(const ModelConfig& m) {
  GPTShape s;
  s.L = m.n_layer;
  s.C = m.n_embd;
  s.Hq = m.n_head;
  s.Hkv = m.kv_heads();
  s.d = m.head_dim();
  s.V = m.vocab_size;
  s.Vp = m.padded_vocab_size();
  s.maxT = m.max_seq_len;
  s.rope = m.rope();
  s.rope_theta = float(m.rope_theta);
  return s;
}

int64_t ParameterSpec::numel() const {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

std::vector<ParameterSpec> parameter_specs(const GPTShape& s) {
  const int64_t L = s.L, C = s.C, QKV = int64_t(s.qkv_heads()) * s.d;
  return {
      {"wte", {s.Vp, C}, true},         {"wpe", {s.rope ? 0 : s.maxT, C}, true},
      {"ln1w", {L, C}, false},          {"ln1b", {L, C}, false},
      {"qkvw", {L, QKV, C}, true},      {"qkvb", {L, QKV}, false},
      {"attprojw", {L, C, C}, true},    {"attprojb", {L, C}, false},
      {"ln2w", {L, C}, false},          {"ln2b", {L, C}, false},
      {"fcw", {L, 4 * C, C}, true},     {"fcb", {L, 4 * C}, false},
      {"fcprojw", {L, C, 4 * C}, true}, {"fcprojb", {L, C}, false},
      {"lnfw", {C}, false},             {"lnfb", {C}, false},
  };
}

int64_t num_parameters(const GPTShape& s) {
  int64_t n = 0;
  for (const auto& p : parameter_specs(s)) n += p.numel();
  return n;
}

int64_t flops_per_token(const GPTShape& s, int N, bool causal_halved) {
  // 6 FLOPs per parameter per token (forward 2, backward 4) for every matmul weight, counting the
  // tied LM head (wte) but not the position table (a lookup); attention's QK^T and PV add
  // 12 * L * C * N per token over the full square, half of it under the causal mask.
  const int64_t matmul_params = num_parameters(s) - (s.rope ? 0 : int64_t(s.maxT) * s.C);
  const int64_t attention = 12ll * s.L * s.C * N;
  return 6 * matmul_params + (causal_halved ? attention / 2 : attention);
}

namespace {

// The 16 parameter tensors as views of a flat buffer of any dtype (llm.c order). Without
// with_layers the flat buffer holds only the non-layer tensors (wte, wpe, lnfw, lnfb) and the
// 12 layer tensors get their shapes but no data (sharded layers, core/zero3.h).
ParameterTensors carve_parameters(const Tensor& flat, const std::vector<ParameterSpec>& specs,
                                  bool with_layers = true) {
  ParameterTensors out;
  int64_t off = 0;
  for (int i = 0; i < kNumParameterTensors; ++i) {
    const bool stored = with_layers || i < kFirstLayerTensor || i >= kFirstLayerTensor + kNumLayerTensors;
    Tensor t = flat;
    t.data = stored ? static_cast<char*>(flat.data) + size_t(off) * dtype_size(flat.dtype) : nullptr;
    t.ndim = int(specs[size_t(i)].shape.size());
    for (int k = 0; k < t.ndim; ++k) t.shape[k] = specs[size_t(i)].shape[size_t(k)];
    out.t[size_t(i)] = t;
    if (stored) off += specs[size_t(i)].numel();
  }
  return out;
}

// Zeroes an allocated arena on the context's stream. The arenas are allocated unzeroed and
// zeroed here because Arena::zero's cudaMemset runs on the legacy default stream, which the
// model's non-blocking stream does not wait for.
void zero_arena(ops::Context& ctx, const Arena& arena) {
  if (arena.bytes() == 0) return;
  ops::fill_zero(ctx, Tensor(arena.base(), {int64_t(arena.bytes() / 4)}, DType::f32, arena.device()));
}

}  // namespace

Tensor layer_slice(const Tensor& stacked, int l) {
  Tensor t = stacked.rows(l, 1);
  // drop the leading 1
  Tensor out = t;
  out.ndim = t.ndim - 1;
  for (int i = 0; i < out.ndim; ++i) out.shape[i] = t.shape[i + 1];
  return out;
}

LayerTensors GPT::layer_params(int l) {
  if (run_.sharded_layer_params) {
    ULYSSES_ASSERT(hooks_, "sharded layer parameters without LayerHooks");
    return hooks_->layer_params(l);
  }
  LayerTensors out;
  for (int k = 0; k < kNumLayerTensors; ++k) out.t[k] = layer_slice(params_.t[kFirstLayerTensor + k], l);
  return out;
}

LayerTensors GPT::layer_grads(int l) {
  if (run_.sharded_layer_grads) {
    ULYSSES_ASSERT(hooks_, "sharded layer gradients without LayerHooks");
    return hooks_->layer_grads(l);
  }
  LayerTensors out;
  for (int k = 0; k < kNumLayerTensors; ++k) out.t[k] = layer_slice(grads_.t[kFirstLayerTensor + k], l);
  return out;
}

// ---- activations --------------------------------------------------------------------------------

Recompute parse_recompute(const std::string& name) {
  if (name == "none") return Recompute::none;
  if (name == "selective") return Recompute::selective;
  if (name == "full") return Recompute::full;
  throw_user_error("runtime.recompute: expected none, selective or full, got '{}'", name);
}

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::selective: return "selective";
    case Recompute::full: return "full";
  }
  return "?";
}

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

// What is stored where, per recompute mode (and MLP tiling, which makes fch / fch_gelu
// chunk-sized and recomputed per chunk in backward):
//   none:      every Layer field per layer
//   selective: ln1 and ln2 of every layer share ln_work; fch and fch_gelu share work's
//   full:      only residual3 per layer; the rest of every Layer is `work`; with offloaded
//              checkpoints not even that: residual3 is one of min(L, kCheckpointSlots) slots
// Reserves into `arena` (which is not allocated here); `slots` gets the (view, offset) pairs the
// constructor turns into tensors, `list` the description the memory estimate reads.
void GPT::lay_out(const GPTShape& s, const GPTRunShape& run, int hq, int hkv, size_t sp_scratch, Device device,
                  Activations& A, Arena& arena, std::vector<ActivationBuffer>* list,
                  std::vector<std::pair<Tensor*, size_t>>* slots) {
  const int B = run.B, N = run.N, P = run.P, C = s.C, d = s.d;
  const int64_t BT = run.rows(), chunk = run.mlp_chunk();
  const int Htot = s.qkv_heads(), hloc = hq + 2 * hkv;
  const Recompute rc = run.recompute;
  // act: activations, their gradients and the all-to-all scratch; f32: statistics and losses
  const DType act = device == Device::cuda ? DType::bf16 : DType::f32, f32 = DType::f32, i32 = DType::i32;
  auto want = [&](Tensor& t, const char* name, const char* kind, int layer, std::initializer_list<int64_t> dims,
                  DType dt) {
    ActivationBuffer b{name, kind, layer, std::vector<int64_t>(dims), dt, 0};
    int64_t n = 1;
    for (int64_t v : dims) n *= v;
    const size_t before = arena.bytes();
    const size_t off = arena.reserve(size_t(n) * dtype_size(dt));
    b.bytes = arena.bytes() - before;
    t.ndim = int(b.dims.size());
    for (int k = 0; k < t.ndim; ++k) t.shape[k] = b.dims[size_t(k)];
    t.dtype = dt;
    if (slots) slots->push_back({&t, off});
    if (list) list->push_back(std::move(b));
  };
  want(A.tokens, "tokens", "inputs", -1, {BT}, i32);
  want(A.targets, "targets", "inputs", -1, {BT}, i32);
  want(A.positions, "positions", "inputs", -1, {BT}, i32);
  want(A.encoded, "encoded", "layer", -1, {BT, C}, act);
  A.layers.assign(size_t(s.L), Layer{});
  // the shared buffers first: fields below that are not per layer alias them
  Layer& w = A.work;
  if (rc == Recompute::full) {
    want(w.ln1, "ln1/ln2", "recompute", -1, {BT, C}, act);
    want(w.ln1_mean, "ln1_mean", "recompute", -1, {BT}, f32);
    want(w.ln1_rstd, "ln1_rstd", "recompute", -1, {BT}, f32);
    want(w.qkv_full, "qkv", "recompute", -1, {B, N, hloc, d}, act);
    want(w.att_full, "att", "recompute", -1, {B, N, hq, d}, act);
    want(w.lse, "lse", "recompute", -1, {B, hq, N}, f32);
    if (P > 1) want(w.att, "att_local", "recompute", -1, {BT, C}, act);
    want(w.residual2, "residual2", "recompute", -1, {BT, C}, act);
    w.ln2 = w.ln1;
    want(w.ln2_mean, "ln2_mean", "recompute", -1, {BT}, f32);
    want(w.ln2_rstd, "ln2_rstd", "recompute", -1, {BT}, f32);
  } else if (rc == Recompute::selective) {
    want(A.ln_work, "ln1/ln2", "recompute", -1, {BT, C}, act);
  }
  if (rc == Recompute::full && run.offload_checkpoints) {
    A.num_checkpoint_slots = std::min(s.L, kCheckpointSlots);
    for (int k = 0; k < A.num_checkpoint_slots; ++k)
      want(A.checkpoint_slots[size_t(k)], "residual3 slot", "checkpoint_slots", -1, {BT, C}, act);
  }
  // fch and fch_gelu [chunk, 4C] are shared by the layers whenever backward recomputes them:
  // tiled (per chunk), full (the layer's forward) and selective (mlp_backward re-runs the fc GEMM
  // with its GELU epilogue, which writes both: see there)
  const bool shared_mlp = rc != Recompute::none || run.mlp_tiled();
  if (shared_mlp) {
    want(w.fch, "fch", "recompute", -1, {chunk, 4 * C}, act);
    want(w.fch_gelu, "fch_gelu", "recompute", -1, {chunk, 4 * C}, act);
  }
  for (int l = 0; l < s.L; ++l) {
    Layer& a = A.layers[size_t(l)];
    if (rc == Recompute::full) {
      a = w;
      if (run.offload_checkpoints)
        a.residual3 = A.checkpoint_slots[size_t(l % A.num_checkpoint_slots)];  // re-pointed by the constructor
      else
        want(a.residual3, "residual3", "layer", l, {BT, C}, act);
      continue;
    }
    if (rc == Recompute::selective) {
      a.ln1 = a.ln2 = A.ln_work;
    } else {
      want(a.ln1, "ln1", "layer", l, {BT, C}, act);
    }
    want(a.ln1_mean, "ln1_mean", "attention_stats", l, {BT}, f32);
    want(a.ln1_rstd, "ln1_rstd", "attention_stats", l, {BT}, f32);
    want(a.qkv_full, "qkv", "layer", l, {B, N, hloc, d}, act);
    want(a.att_full, "att", "layer", l, {B, N, hq, d}, act);
    want(a.lse, "lse", "attention_stats", l, {B, hq, N}, f32);
    if (P > 1) want(a.att, "att_local", "layer", l, {BT, C}, act);
    want(a.residual2, "residual2", "layer", l, {BT, C}, act);
    if (rc != Recompute::selective) want(a.ln2, "ln2", "layer", l, {BT, C}, act);
    want(a.ln2_mean, "ln2_mean", "attention_stats", l, {BT}, f32);
    want(a.ln2_rstd, "ln2_rstd", "attention_stats", l, {BT}, f32);
    if (shared_mlp) {
      a.fch = w.fch;
      a.fch_gelu = w.fch_gelu;
    } else {
      want(a.fch, "fch", "layer", l, {BT, 4 * C}, act);
      want(a.fch_gelu, "fch_gelu", "layer", l, {BT, 4 * C}, act);
    }
    want(a.residual3, "residual3", "layer", l, {BT, C}, act);
  }
  want(A.lnf, "lnf", "lm_head", -1, {BT, C}, act);
  want(A.lnf_mean, "lnf_mean", "lm_head", -1, {BT}, f32);
  want(A.lnf_rstd, "lnf_rstd", "lm_head", -1, {BT}, f32);
  want(A.losses, "losses", "lm_head", -1, {BT}, f32);
  want(A.logits, "logits", "lm_head", -1, {run.lm_head_chunk(), s.Vp}, act);
  if (device == Device::cuda) want(A.logits_row, "logits_row", "lm_head", -1, {s.Vp}, f32);
  if (P > 1) {
    want(A.qkv_local, "qkv_local", "comm", -1, {B, run.T(), Htot, d}, act);
    want(A.dqkv_local, "dqkv_local", "comm", -1, {B, run.T(), Htot, d}, act);
    want(A.sp_send, "all_to_all_send", "comm", -1, {int64_t(sp_scratch)}, act);
    want(A.sp_recv, "all_to_all_recv", "comm", -1, {int64_t(sp_scratch)}, act);
  }
  want(A.dqkv_full, "dqkv", "backward", -1, {B, N, hloc, d}, act);
  want(A.datt_full, "datt", "backward", -1, {B, N, hq, d}, act);
  want(A.dres, "dresidual", "backward", -1, {BT, C}, act);
  want(A.dlnf, "dlnf", "backward", -1, {BT, C}, act);
  want(A.dln, "dln", "backward", -1, {BT, C}, act);
  if (P > 1) want(A.datt, "datt_local", "backward", -1, {BT, C}, act);
  want(A.dfch_gelu, "dfch_gelu", "backward", -1, {chunk, 4 * C}, act);
  want(A.dfch, "dfch", "backward", -1, {chunk, 4 * C}, act);
}

std::vector<ActivationBuffer> GPT::activation_layout(const GPTShape& s, const GPTRunShape& run, int hq, int hkv,
                                                     size_t sp_scratch_elements, Device device) {
  Activations A;
  Arena arena("activations (layout only)", Device::cpu);  // reserve() only: nothing is allocated
  std::vector<ActivationBuffer> list;
  lay_out(s, run, hq, hkv, sp_scratch_elements, device, A, arena, &list, nullptr);
  return list;
}

void GPT::check_cuda_shape(const ModelConfig& m, bool cudnn_attention) {
  const int qkv_width = (m.n_head + 2 * m.kv_heads()) * m.head_dim();
  if (m.n_embd % 8 != 0)
    throw_user_error("model.n_embd = {}: runtime.device cuda needs a multiple of 8 (16-byte bf16 rows for cuBLASLt)",
                     m.n_embd);
  if (qkv_width % 8 != 0)
    throw_user_error("model.n_head / model.n_kv_head: the qkv width (n_head + 2 n_kv_head) * head_dim = ({} + 2 * {}) "
                     "* {} = {} must be a multiple of 8 on runtime.device cuda",
                     m.n_head, m.kv_heads(), m.head_dim(), qkv_width);
  if (!cudnn_attention && m.head_dim() != 64 && m.head_dim() != 128)
    throw_user_error("model.n_embd / model.n_head: head_dim = {} / {} = {}, but the flash attention kernels of "
                     "runtime.device cuda take head_dim 64 or 128 (runtime.attention: cudnn takes others)",
                     m.n_embd, m.n_head, m.head_dim());
  // cuDNN's SDPA (kernels/cuda/attention_cudnn.h) takes head dims that are multiples of 8 up to
  // 128; the flash kernels' 64 and 128 are among them, so the constructor's check covers both
  if (m.head_dim() % 8 != 0 || m.head_dim() > 128)
    throw_user_error("model.n_embd / model.n_head: head_dim = {} / {} = {}, but runtime.device cuda takes a "
                     "head_dim that is a multiple of 8 and at most 128 (runtime.attention: cudnn; flash: 64 or 128)",
                     m.n_embd, m.n_head, m.head_dim());
}

// Page-locked host memory for the three int32 input rows [3, B*T] (tokens, targets, positions),
// so their host -> device copies are asynchronous. Allocated once, in the constructor. A slot is
// rewritten only by the next micro-batch, which starts after the previous one's loss sum has
// synchronised the stream (so the previous copy out of it has finished).
struct GPT::HostStaging {
  int32_t* data = nullptr;
  int64_t row = 0;  // B*T
  explicit HostStaging(int64_t rows) : row(rows) {
#ifdef ULYSSES_CUDA
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&data), size_t(3 * rows) * 4, cudaHostAllocDefault));
#else
    throw std::runtime_error("pinned host memory, but ulysses was built without CUDA");
#endif
  }
  ~HostStaging() {
#ifdef ULYSSES_CUDA
    if (data) cudaFreeHost(data);  // not checked: destructors must not throw
#endif
  }
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  Tensor slot(int i) const { return Tensor(data + i * row, {row}, DType::i32, Device::cpu); }
};

// runtime.offload = checkpoints: layer l's output (residual3 [B*T, C] bf16, `layer_bytes`) lives
// in device slot l % 3 (Activations::checkpoint_slots); layers l < L - 3 ("offloaded") are copied
// to host[l] in forward and back in backward, on this struct's own stream. Everything here is
// created once; a step only records and waits on events (no allocation, no host wait).
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
struct GPT::CheckpointOffload {
  int L = 0;
  size_t layer_bytes = 0;
  char* host = nullptr;  // pinned [offloaded_checkpoint_layers(L), B*T, C] bf16
#ifdef ULYSSES_CUDA
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;            // model stream -> copy stream, re-recorded before each copy
  std::vector<cudaEvent_t> out, in;       // per offloaded layer: its D2H / H2D copy is done
#endif

  CheckpointOffload(int layers, size_t bytes_per_layer) : L(layers), layer_bytes(bytes_per_layer) {
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
  ~CheckpointOffload() { release(); }
  CheckpointOffload(const CheckpointOffload&) = delete;
  CheckpointOffload& operator=(const CheckpointOffload&) = delete;

  // not checked: called from the destructor and on the constructor's error path
  void release() {
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

  bool offloaded(int l) const { return l >= 0 && l < offloaded_checkpoint_layers(L); }

#ifdef ULYSSES_CUDA
  // the copy stream starts only after what `model` has enqueued so far
  void follow(cudaStream_t model) {
    CUDA_CHECK(cudaEventRecord(ready, model));
    CUDA_CHECK(cudaStreamWaitEvent(stream, ready, 0));
  }
#endif

  void before_forward([[maybe_unused]] int l, [[maybe_unused]] void* model) {
#ifdef ULYSSES_CUDA
    if (offloaded(l - kCheckpointSlots)) CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(model), out[size_t(l - kCheckpointSlots)], 0));
#endif
  }
  // slot: layer l's output, complete once what `model` has enqueued has run
  void after_forward([[maybe_unused]] int l, [[maybe_unused]] void* model, [[maybe_unused]] const Tensor& slot) {
#ifdef ULYSSES_CUDA
    if (!offloaded(l)) return;
    ULYSSES_ASSERT(slot.bytes() == layer_bytes, "checkpoint slot of {} bytes, expected {}", slot.bytes(), layer_bytes);
    follow(static_cast<cudaStream_t>(model));
    CUDA_CHECK(cudaMemcpyAsync(host + size_t(l) * layer_bytes, slot.data, layer_bytes, cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaEventRecord(out[size_t(l)], stream));
#endif
  }
  // slot_below: the slot layer l - 2's output goes to (slot (l - 2) % 3)
  void before_backward([[maybe_unused]] int l, [[maybe_unused]] void* model,
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
};

GPT::GPT(const ModelConfig& cfg, GPTRunShape run, Device device, Communicator* seq, GPT* shared_params)
    : shape_(GPTShape::from(cfg)),
      init_std_(cfg.init_std),
      run_(run),
      device_(device),
      seq_(run.P > 1 ? seq : nullptr),
      param_arena_(device == Device::cuda ? "parameters (fp32 master)" : "parameters", device),
      compute_arena_("parameters (bf16 compute copy)", device),
      grad_arena_("gradients", device),
      act_arena_("activations", device) {
  if (device == Device::cuda) check_cuda_shape(cfg, /*cudnn_attention=*/true);  // head_dim: in forward
  if (run.offload_checkpoints && (run.recompute != Recompute::full || device != Device::cuda))
    throw_user_error("runtime.offload 'checkpoints' needs runtime.recompute full and runtime.device cuda, got "
                     "recompute {} on {}",
                     recompute_name(run.recompute), device_name(device));
  ctx_ = ops::Context(device);
  if (seq_) seq_->set_stream(ctx_.stream());
  const GPTShape& s = shape_;
  const int B = run.B, N = run.N, P = run.P, T = run.T(), C = s.C, d = s.d;
  ULYSSES_ASSERT(N % P == 0, "N = {} not divisible by P = {}", N, P);
  if (N > s.maxT && !s.rope)
    throw_user_error("train.seq_len = {} exceeds model.max_seq_len = {} (the learned position table)", N, s.maxT);
  const int64_t BT = int64_t(B) * T;

  // -- parameters and gradients: one buffer each, llm.c order. With sharded layers (ZeRO 2 / 3,
  //    core/zero3.h) a buffer holds only the non-layer tensors wte, wpe, lnfw, lnfb, and the
  //    layer tensors keep their shapes but no data. Every arena is allocated unzeroed and zeroed
  //    on ctx_'s stream (zero_arena), so later ops on the stream see the zeros.
  const auto specs = parameter_specs(s);
  const int64_t n_params = num_parameters(s);
  ULYSSES_ASSERT(!run.sharded_layer_params || run.sharded_layer_grads, "sharded layer parameters need sharded gradients");
  int64_t n_layer_tensors = 0;
  for (int k = 0; k < kNumLayerTensors; ++k) n_layer_tensors += specs[size_t(kFirstLayerTensor + k)].numel();
  // parameters this model stores (with sharded layer parameters: the rest only)
  const int64_t n_p = run.sharded_layer_params ? n_params - n_layer_tensors : n_params;
  if (shared_params) {
    ULYSSES_ASSERT(shared_params->shape_.L == s.L && shared_params->shape_.C == s.C &&
                       shared_params->device_ == device,
                   "shared parameters of another shape or device");
    ULYSSES_ASSERT(!shared_params->run_.sharded_layer_params && !run.sharded_layer_params,
                   "a model with sharded layer parameters cannot share them");
    params_flat_ = shared_params->params_flat_;
    params_padded_ = shared_params->params_padded_;
    compute_padded_ = shared_params->compute_padded_;
  } else {
    // zero padding to a multiple of flat_multiple (the arenas are zeroed on allocation and
    // nothing writes the padding, so it stays 0 through training)
    const int64_t m = std::max(1, run.flat_multiple);
    const int64_t n_g = run.sharded_layer_grads ? n_params - n_layer_tensors : n_params;
    const int64_t p_padded = (n_p + m - 1) / m * m, g_padded = (n_g + m - 1) / m * m;
    if (device == Device::cuda && !run.master_weights) {
      // no fp32 master here (GPTRunShape::master_weights): empty views, the compute copy below
      params_padded_ = Tensor(nullptr, {0}, DType::f32, device);
      params_flat_ = params_padded_;
    } else {
      const size_t p_off = param_arena_.reserve(size_t(p_padded) * 4);
      param_arena_.allocate(/*zero=*/false);
      zero_arena(ctx_, param_arena_);
      params_padded_ = param_arena_.tensor(p_off, {p_padded}, DType::f32);  // fp32 [p_padded]
      params_flat_ = params_padded_.rows(0, n_p);
    }
    if (device == Device::cuda) {
      const size_t c_off = compute_arena_.reserve(size_t(p_padded) * 2);
      compute_arena_.allocate(/*zero=*/false);
      zero_arena(ctx_, compute_arena_);
      compute_padded_ = compute_arena_.tensor(c_off, {p_padded}, DType::bf16);  // bf16 [p_padded]
    } else {
      compute_padded_ = params_padded_;
    }
    const size_t g_off = grad_arena_.reserve(size_t(g_padded) * 4);
    grad_arena_.allocate(/*zero=*/false);
    zero_arena(ctx_, grad_arena_);
    grads_padded_ = grad_arena_.tensor(g_off, {g_padded}, DType::f32);       // fp32 [g_padded]
    grads_flat_ = grads_padded_.rows(0, n_g);
    grads_ = carve_parameters(grads_flat_, specs, !run.sharded_layer_grads);
  }
  // forward/backward read the compute copy: bf16 on cuda (every tensor starts at a multiple of
  // 8 elements, 16 bytes, since C and the qkv width are multiples of 8), params_flat_ on cpu
  params_ = carve_parameters(compute_padded_.rows(0, n_p), specs, !run.sharded_layer_params);

  // -- the Ulysses all-to-alls and this rank's heads
  hq_ = s.Hq;
  hkv_ = s.Hkv;
  if (P > 1) {
    ULYSSES_ASSERT(seq_ && seq_->size() == P, "P = {} needs a sequence communicator of that size", P);
    // the all-to-alls are enqueued after the model's kernels on ctx_'s stream (device
    // communicators); on cuda the head maps are copied to the device here, once
    seq_->set_stream(ctx_.stream());
    if (run.all_to_all_chunks < 1 || run.all_to_all_chunks > T)
      throw_user_error("runtime.all_to_all_chunks = {} must be in [1, T] with T = train.seq_len / parallel.sequence "
                       "= {} / {} = {} local tokens",
                       run.all_to_all_chunks, N, P, T);
    ulysses_ = std::make_unique<UlyssesAllToAll>(seq_, plan_ulysses_heads(s.Hq, s.Hkv, P), B, T, d, &ctx_,
                                                 run.all_to_all_chunks);
    hq_ = ulysses_->plan().local_q_heads(seq_->rank());
    hkv_ = ulysses_->plan().local_kv_heads(seq_->rank());
  }
  // -- activations: reserve everything (lay_out), allocate once, then take the views
  act_ = std::make_unique<Activations>();
  Activations& A = *act_;
  std::vector<std::pair<Tensor*, size_t>> slots;
  lay_out(s, run, hq_, hkv_, P > 1 ? ulysses_->scratch_elements() : 0, device, A, act_arena_, nullptr, &slots);
  act_arena_.allocate(/*zero=*/false);
  zero_arena(ctx_, act_arena_);
  for (auto& [t, offset] : slots) {
    t->data = static_cast<char*>(act_arena_.base()) + offset;
    t->device = device;
    ULYSSES_ASSERT(offset + t->bytes() <= act_arena_.bytes(), "activation overrun");
  }
  // views that alias a shared buffer were copied from it before it had memory: copy them again
  if (run.recompute == Recompute::full) A.work.ln2 = A.work.ln1;
  const bool shared_mlp = run.recompute != Recompute::none || run.mlp_tiled();
  for (size_t l = 0; l < A.layers.size(); ++l) {
    Layer& a = A.layers[l];
    if (run.recompute == Recompute::full) {
      const Tensor own = run.offload_checkpoints ? A.checkpoint_slots[l % size_t(A.num_checkpoint_slots)] : a.residual3;
      a = A.work;
      a.residual3 = own;
    } else if (run.recompute == Recompute::selective) {
      a.ln1 = a.ln2 = A.ln_work;
    }
    if (shared_mlp) {
      a.fch = A.work.fch;
      a.fch_gelu = A.work.fch_gelu;
    }
  }
  if (P == 1) {
    // attention works in place on the local tensors: no all-to-all, no copies
    for (Layer& a : A.layers) a.att = a.att_full.reshape({BT, C});
    A.work.att = A.work.att_full.empty() ? Tensor() : A.work.att_full.reshape({BT, C});
    A.datt = A.datt_full.reshape({BT, C});
  } else {
    ulysses_->set_scratch(A.sp_send, A.sp_recv);
  }
  if (device == Device::cuda) staging_ = std::make_unique<HostStaging>(BT);
  if (run.offload_checkpoints) offload_ = std::make_unique<CheckpointOffload>(s.L, BT * C * 2);
}

// The all-to-alls first: chunked exchanges still in flight (an error unwound past their waits)
// read and write the activation arena's scratch, so they complete (or are waited for) before
// the arena is freed.
GPT::~GPT() { ulysses_.reset(); }

size_t GPT::activation_bytes() const { return act_arena_.bytes(); }

size_t GPT::offloaded_checkpoint_bytes() const {
  return offload_ ? size_t(offloaded_checkpoint_layers(shape_.L)) * offload_->layer_bytes : 0;
}

void GPT::matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias) {
  if (counting_) op_counts_.matmul_flops += 2ull * uint64_t(out.numel()) * uint64_t(inp.size(-1));
  ops::matmul_forward(ctx_, out, inp, weight, bias);
}

void GPT::matmul_gelu_forward(Tensor out_gelu, Tensor pre_gelu, Tensor inp, Tensor weight, Tensor bias) {
  if (counting_) op_counts_.matmul_flops += 2ull * uint64_t(pre_gelu.numel()) * uint64_t(inp.size(-1));
  ops::matmul_gelu_forward(ctx_, out_gelu, pre_gelu, inp, weight, bias);
}

void GPT::matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight) {
  const uint64_t one = 2ull * uint64_t(dout.numel()) * uint64_t(inp.size(-1));  // 2 M OC IC
  if (counting_) op_counts_.matmul_flops += (dinp.empty() ? 0 : one) + (dweight.empty() ? 0 : one);
  ops::matmul_backward(ctx_, dinp, dweight, dbias, dout, inp, weight);
}

// ---- init -------------------------------------------------------------------------------------

void parameter_init_values(const GPTShape& s, double init_std, uint64_t seed,
                           const std::function<void(int tensor, int64_t begin, const float* values, int64_t n)>& sink) {
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return (double(rng() >> 11) + 0.5) * (1.0 / 9007199254740992.0); };
  // chunks of an even length: a Box-Muller pair never straddles two chunks, so the stream is the
  // same as one pass over the whole tensor
  constexpr int64_t kChunk = 1 << 16;
  std::vector<float> buf(static_cast<size_t>(kChunk));
  auto normal = [&](int tensor, int64_t n, double std) {
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      float* p = buf.data();
      for (int64_t i = 0; i < len; i += 2) {
        const double u1 = uniform(), u2 = uniform();
        const double r = std::sqrt(-2.0 * std::log(u1));
        p[i] = float(std * r * std::cos(2 * M_PI * u2));
        if (i + 1 < len) p[i + 1] = float(std * r * std::sin(2 * M_PI * u2));
      }
      sink(tensor, c, p, len);
    }
  };
  auto fill = [&](int tensor, int64_t n, float v) {
    std::fill(buf.begin(), buf.end(), v);
    for (int64_t c = 0; c < n; c += kChunk) sink(tensor, c, buf.data(), std::min(kChunk, n - c));
  };
  const double residual_std = init_std / std::sqrt(2.0 * s.L);
  const std::vector<ParameterSpec> specs = parameter_specs(s);
  for (int i = 0; i < kNumParameterTensors; ++i) {
    const ParameterSpec& p = specs[size_t(i)];
    const int64_t n = p.numel();
    if (n == 0) continue;  // wpe with rotary positions
    if (p.name == "attprojw" || p.name == "fcprojw")
      normal(i, n, residual_std);
    else if (p.weight_decay)  // wte, wpe, qkvw, fcw
      normal(i, n, init_std);
    else
      fill(i, n, p.name == "ln1w" || p.name == "ln2w" || p.name == "lnfw" ? 1.f : 0.f);
  }
}

void GPT::init_weights(uint64_t seed) {
  // The values come from parameter_init_values, on the host: in place on cpu; on cuda into a
  // host copy of the master weights, copied over below, so both devices get the same fp32
  // values. Only the tensors this model stores (with sharded layers: wte, wpe, lnfw, lnfb;
  // core/zero3.h initialises the layer shards from the same stream).
  ULYSSES_ASSERT(device_ != Device::cuda || run_.master_weights,
                 "init_weights on a cuda model without master weights (LayerShardedZero::init_weights initialises)");
  const int64_t n = params_flat_.numel();
  std::vector<float> host_master(device_ == Device::cuda ? size_t(n) : 0);
  const Tensor master = device_ == Device::cuda ? Tensor(host_master.data(), {n}, DType::f32, Device::cpu)
                                                : params_flat_;
  const ParameterTensors p = carve_parameters(master, parameter_specs(shape_), !run_.sharded_layer_params);
  parameter_init_values(shape_, init_std_, seed, [&](int i, int64_t begin, const float* values, int64_t count) {
    const Tensor& t = p.t[size_t(i)];
    if (t.data) std::memcpy(t.f32() + begin, values, size_t(count) * 4);
  });
  if (device_ == Device::cuda) {
    ops::copy(ctx_, params_flat_, master);
    ops::synchronize(ctx_);  // host_master is freed on return
  }
  refresh_compute_params();
}

void GPT::refresh_compute_params() {
  // fp32 -> bf16, padding 0 -> 0; without master weights the optimizer writes the compute copy
  if (device_ == Device::cuda && !params_padded_.empty()) ops::cast(ctx_, compute_padded_, params_padded_);
}

void GPT::zero_grad() { ops::fill_zero(ctx_, grads_flat_); }

// ---- forward ----------------------------------------------------------------------------------

// LN1 output -> residual2 = Wo · attention(...) + bo (without the residual: the LayerNorm that
// follows adds it). With P > 1 the two all-to-alls surround the attention; with
// runtime.all_to_all_chunks > 1 each is pipelined chunk by chunk with the GEMM beside it
// (comm/ulysses.h: F1 with the qkv GEMM, F2 with the attproj GEMM).
void GPT::attention_forward(Layer& a, int l) {
  const GPTShape& s = shape_;
  const int B = run_.B, T = run_.T(), d = s.d, Htot = s.qkv_heads();
  Activations& A = *act_;
  LayerTensors p = layer_params(l);
  const bool chunked = run_.P > 1 && ulysses_->chunks_per_row() > 1;
  // qkv = ln1 · Wqkv + b        [B*T, C] -> [B, T, Hq + 2Hkv, d]
  Tensor qkv = run_.P > 1 ? A.qkv_local : a.qkv_full;
  if (!chunked) {
    matmul_forward(qkv.reshape({int64_t(B) * T, int64_t(Htot) * d}), a.ln1, p.qkvw(), p.qkvb());
    if (s.rope) {  // rotate q and k by their global positions, before they leave the rank
      ops::rope_forward(ctx_, qkv, 0, s.Hq + s.Hkv, A.positions, s.rope_theta);
    }
    if (run_.P > 1) {
      // all-to-all #1: [B, N/P, Hq + 2Hkv, d] -> [B, N, hq + 2hkv, d]
      ulysses_->all_to_all_qkv_heads_to_seq(ctx_, a.qkv_full, A.qkv_local);
    }
  } else {
    // F1: per chunk of rows [r, r + n): qkv GEMM, rope, pack, start its exchange
    const Tensor qkv_rows = qkv.reshape({int64_t(B) * T, int64_t(Htot), int64_t(d)});
    for (int c = 0; c < ulysses_->num_chunks(); ++c) {
      const int64_t r = ulysses_->first_row(c), n = ulysses_->chunk(c).t_count;
      Tensor q = qkv_rows.rows(r, n);  // [n, Hq + 2Hkv, d]
      matmul_forward(q.reshape({n, int64_t(Htot) * d}), a.ln1.rows(r, n), p.qkvw(), p.qkvb());
      if (s.rope) ops::rope_forward(ctx_, q, 0, s.Hq + s.Hkv, A.positions.rows(r, n), s.rope_theta);
      ulysses_->qkv_heads_to_seq_start_chunk(ctx_, c, qkv);
    }
    ulysses_->qkv_heads_to_seq_finish(ctx_, a.qkv_full);  // [B, N, hq + 2hkv, d]
  }
  // causal attention over all N tokens for this rank's heads: [B, N, hq, d], lse [B, hq, N]
  if (counting_) op_counts_.attention_flops += 2ull * uint64_t(B) * uint64_t(hq_) * uint64_t(run_.N) * uint64_t(run_.N) * uint64_t(d);
  ops::attention_forward(ctx_, a.att_full, a.lse, a.qkv_full, hq_, hkv_);
  if (!chunked) {
    if (run_.P > 1) {
      // all-to-all #2: [B, N, hq, d] -> [B, N/P, Hq, d] = [B*T, C]
      ulysses_->all_to_all_out_seq_to_heads(ctx_, a.att.reshape({B, T, s.Hq, d}), a.att_full);
    }
    matmul_forward(a.residual2, a.att, p.attprojw(), p.attprojb());
  } else {
    // F2: every chunk's exchange started at once; per chunk: wait, unpack its rows, attproj GEMM
    ulysses_->out_seq_to_heads_start(ctx_, a.att_full);
    const Tensor att = a.att.reshape({B, T, s.Hq, d});
    for (int c = 0; c < ulysses_->num_chunks(); ++c) {
      const int64_t r = ulysses_->first_row(c), n = ulysses_->chunk(c).t_count;
      ulysses_->out_seq_to_heads_finish_chunk(ctx_, c, att);
      matmul_forward(a.residual2.rows(r, n), a.att.rows(r, n), p.attprojw(), p.attprojb());  // [n, C]
    }
  }
}

// The MLP in chunks of mlp_chunk() rows (one chunk when untiled): fc + gelu (one GEMM, the GELU in
// its epilogue) -> fcproj per chunk, so fch / fch_gelu need only [chunk, 4C]. Leaves
// residual3 = fcproj(...) without the residual: the op that normalises residual3 next adds it.
void GPT::mlp_forward(Layer& a, int l) {
  const int64_t BT = run_.rows(), chunk = run_.mlp_chunk();
  LayerTensors p = layer_params(l);
  for (int64_t r = 0; r < BT; r += chunk) {
    const int64_t n = std::min(chunk, BT - r);
    Tensor fch = a.fch.rows(run_.mlp_tiled() ? 0 : r, n), gelu = a.fch_gelu.rows(0, n);
    // fch [n, 4C] = LN2 · W1^T + b1, gelu [n, 4C] = gelu(fch)
    matmul_gelu_forward(gelu, fch, a.ln2.rows(r, n), p.fcw(), p.fcb());
    matmul_forward(a.residual3.rows(r, n), gelu, p.fcprojw(), p.fcprojb());  // [n, C]
  }
}

// Layer l from LN1(x) to the MLP's output. The residual stream's additions are fused into the
// LayerNorms that follow them (ops::residual_layernorm_forward), which removes a read and a
// write of [B*T, C] per addition (docs/benchmarks.md, "Fused epilogues"):
//   ln1 = LN1(x)                       made by the caller (forward: fused with the add that made x)
//   residual2 = x + Wo · attention(ln1) + bo;  ln2 = LN2(residual2)      one pass
//   fch = W1 · ln2 + b1;  fch_gelu = gelu(fch)                           one GEMM (GELU epilogue)
//   residual3 = W2 · fch_gelu + b2     the caller's next LayerNorm adds residual2 (LN1 of layer
//                                      l + 1, or the final LN), also in one pass
// recompute (full recompute in backward): LN1(x) is made here from the stored x, bitwise the
// fused forward's (ops.h), and only what backward reads is recomputed: no W2 GEMM, and with a
// tiled MLP no MLP at all (mlp_backward recomputes it chunk by chunk).
void GPT::block_forward(Layer& a, int l, Tensor x, bool recompute) {
  LayerTensors p = layer_params(l);
  if (recompute) ops::layernorm_forward(ctx_, a.ln1, a.ln1_mean, a.ln1_rstd, x, p.ln1w(), p.ln1b());
  // attention block: residual2 = x + Wo · attention(LN1(x)) + bo, then LN2 of it
  attention_forward(a, l);
  ops::residual_layernorm_forward(ctx_, a.residual2, a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, x, p.ln2w(),
                                  p.ln2b());
  // MLP block: residual3 = residual2 + W2 · gelu(W1 · LN2 + b1) + b2 (the addition left to the caller)
  if (!recompute) {
    mlp_forward(a, l);
  } else if (!run_.mlp_tiled()) {
    matmul_gelu_forward(a.fch_gelu, a.fch, a.ln2, p.fcw(), p.fcb());  // [B*T, 4C]: what mlp_backward reads
  }
}

int64_t GPT::check_inputs(const int32_t* tokens, const int32_t* targets, const int32_t* positions) const {
  const GPTShape& s = shape_;
  const int64_t BT = run_.rows();
  for (int64_t i = 0; i < BT; ++i) {
    if (tokens[i] < 0 || tokens[i] >= s.V)
      throw_user_error("token id {} at position {} is outside the vocabulary [0, {})", tokens[i], i, s.V);
    if (positions[i] < 0 || (!s.rope && positions[i] >= s.maxT))
      throw_user_error("position {} is outside [0, model.max_seq_len = {})", positions[i], s.maxT);
  }
  int64_t valid = 0;
  if (targets) {
    for (int64_t i = 0; i < BT; ++i) {
      if (targets[i] >= s.V)
        throw_user_error("target token id {} at position {} is outside the vocabulary [0, {})", targets[i], i, s.V);
      valid += targets[i] >= 0;
    }
  }
  if (device_ == Device::cuda && !ctx_.cudnn_attention && s.d != 64 && s.d != 128)
    throw_user_error("model.n_embd / model.n_head: head_dim = {} / {} = {}, but the flash attention kernels of "
                     "runtime.device cuda take head_dim 64 or 128 (runtime.attention: cudnn takes others)",
                     s.C, s.Hq, s.d);
  return valid;
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

// Enqueues the forward pass on inputs already checked by check_inputs.
void GPT::forward(const int32_t* tokens, const int32_t* positions, bool offload) {
  const GPTShape& s = shape_;
  Activations& A = *act_;
  upload_input(A.tokens, tokens, 0);
  upload_input(A.positions, positions, 2);
  auto& p = params_;
  // x = wte[tokens] + wpe[positions]                          [B*T, C]
  ops::embedding_forward(ctx_, A.encoded, A.tokens, A.positions, p.wte(), s.rope ? Tensor() : p.wpe());
  // LayerNorm of the residual stream entering layer l (l == L: the final LN). Past layer 0 the
  // stream is completed first, in the same pass: residual3 = residual2 + the MLP's output.
  auto normalise_stream = [&](int l, Tensor out, Tensor mean, Tensor rstd, Tensor weight, Tensor bias) {
    if (l == 0) {
      ops::layernorm_forward(ctx_, out, mean, rstd, A.encoded, weight, bias);
      return;
    }
    Layer& prev = A.layers[size_t(l - 1)];
    ops::residual_layernorm_forward(ctx_, prev.residual3, out, mean, rstd, prev.residual3, prev.residual2, weight,
                                    bias);
  };
  Tensor x = A.encoded;
  for (int l = 0; l < s.L; ++l) {
    if (hooks_) hooks_->before_forward(l);  // before layer l's parameters (ln1w, ln1b) are read
    Layer& a = A.layers[size_t(l)];
    LayerTensors lp = layer_params(l);
    normalise_stream(l, a.ln1, a.ln1_mean, a.ln1_rstd, lp.ln1w(), lp.ln1b());
    // layer l-1's output is complete only now (the residual add is fused into this LayerNorm)
    if (offload && offload_ && l > 0) offload_->after_forward(l - 1, ctx_.stream(), A.layers[size_t(l - 1)].residual3);
    if (offload && offload_) offload_->before_forward(l, ctx_.stream());  // slot l % 3 free
    block_forward(a, l, x, /*recompute=*/false);
    x = a.residual3;  // complete once the next normalise_stream has run
  }
  normalise_stream(s.L, A.lnf, A.lnf_mean, A.lnf_rstd, p.lnfw(), p.lnfb());
  if (offload && offload_ && s.L > 0) offload_->after_forward(s.L - 1, ctx_.stream(), A.layers[size_t(s.L - 1)].residual3);
}

// The LM head (tied to wte) and the loss, in chunks of rows so the [B*T, Vp] logits are never
// stored whole. With `backward`, each chunk's logits become their gradient in place and flow
// straight into dlnf and dwte. The losses [B*T] stay on the model's device (summed by the caller).
void GPT::classifier(const int32_t* targets, bool backward) {
  const GPTShape& s = shape_;
  Activations& A = *act_;
  const int64_t BT = run_.rows();
  upload_input(A.targets, targets, 1);
  if (backward) ops::fill_zero(ctx_, A.dlnf);
  const int64_t chunk = A.logits.shape[0];
  for (int64_t r = 0; r < BT; r += chunk) {
    const int64_t n = std::min(chunk, BT - r);
    Tensor logits = A.logits.rows(0, n);
    Tensor lnf = A.lnf.rows(r, n);
    matmul_forward(logits, lnf, params_.wte(), Tensor());
    ops::crossentropy_forward_backward(ctx_, A.losses.rows(r, n), logits, A.targets.rows(r, n), s.V,
                                       backward ? 1.f : 0.f);
    if (backward) matmul_backward(A.dlnf.rows(r, n), grads_.wte(), Tensor(), logits, lnf, params_.wte());
  }
}

// ---- backward ---------------------------------------------------------------------------------

// With runtime.all_to_all_chunks > 1 the two all-to-alls are pipelined with the GEMMs beside
// them (comm/ulysses.h: B2 with the attproj dinp GEMM, B1 with the qkv dinp GEMM); the GEMMs split
// into per-chunk dinp calls and one dweight call over all rows (the dweight / dbias GEMMs are
// the combined call's; a dinp row depends on its own row only, but the BLAS may round it
// differently for fewer rows: tests/kernels/test_ulysses_layout.cpp).
void GPT::attention_backward(Layer& a, int l, Tensor dres) {
  const GPTShape& s = shape_;
  Activations& A = *act_;
  const int B = run_.B, T = run_.T(), d = s.d;
  const int64_t BT = int64_t(B) * T, qkv_width = int64_t(s.qkv_heads()) * d;
  LayerTensors p = layer_params(l);
  LayerTensors g = layer_grads(l);
  const bool chunked = run_.P > 1 && ulysses_->chunks_per_row() > 1;
  // out = att · Wo + b: d(att) = dres · Wo
  ops::fill_zero(ctx_, A.datt);
  if (!chunked) {
    matmul_backward(A.datt, g.attprojw(), g.attprojb(), dres, a.att, p.attprojw());
    if (run_.P > 1) {
      // backward of #2: [B, N/P, Hq, d] -> [B, N, hq, d]
      ulysses_->all_to_all_out_heads_to_seq(ctx_, A.datt_full, A.datt.reshape({B, T, s.Hq, d}));
    }
  } else {
    // B2: per chunk: d(att) rows, pack, start; then dWo, dbo over all rows while they fly
    const Tensor datt = A.datt.reshape({B, T, s.Hq, d});
    for (int c = 0; c < ulysses_->num_chunks(); ++c) {
      const int64_t r = ulysses_->first_row(c), n = ulysses_->chunk(c).t_count;
      matmul_backward(A.datt.rows(r, n), Tensor(), Tensor(), dres.rows(r, n), a.att.rows(r, n), p.attprojw());
      ulysses_->out_heads_to_seq_start_chunk(ctx_, c, datt);
    }
    matmul_backward(Tensor(), g.attprojw(), g.attprojb(), dres, a.att, p.attprojw());
    ulysses_->out_heads_to_seq_finish(ctx_, A.datt_full);  // [B, N, hq, d]
  }
  if (counting_) op_counts_.attention_flops += 4ull * uint64_t(B) * uint64_t(hq_) * uint64_t(run_.N) * uint64_t(run_.N) * uint64_t(d);
  ops::attention_backward(ctx_, A.dqkv_full, A.datt_full, a.qkv_full, a.att_full, a.lse, hq_, hkv_);
  if (!chunked) {
    Tensor dqkv = A.dqkv_full;
    if (run_.P > 1) {
      // backward of #1: [B, N, hq + 2hkv, d] -> [B, N/P, Hq + 2Hkv, d]
      ulysses_->all_to_all_qkv_seq_to_heads(ctx_, A.dqkv_local, A.dqkv_full);
      dqkv = A.dqkv_local;
    }
    if (s.rope) ops::rope_backward(ctx_, dqkv, 0, s.Hq + s.Hkv, A.positions, s.rope_theta);
    // qkv = ln1 · Wqkv + b
    ops::fill_zero(ctx_, A.dln);
    matmul_backward(A.dln, g.qkvw(), g.qkvb(), dqkv.reshape({BT, qkv_width}), a.ln1, p.qkvw());
  } else {
    // B1: every chunk's exchange started at once; per chunk: wait, sum its rows into dqkv_local,
    // rope backward and d(ln1) on them; then dWqkv, dbqkv over all rows
    ulysses_->qkv_seq_to_heads_start(ctx_, A.dqkv_full);
    ops::fill_zero(ctx_, A.dqkv_local);
    ops::fill_zero(ctx_, A.dln);
    const Tensor dqkv_rows = A.dqkv_local.reshape({BT, int64_t(s.qkv_heads()), int64_t(d)});
    for (int c = 0; c < ulysses_->num_chunks(); ++c) {
      const int64_t r = ulysses_->first_row(c), n = ulysses_->chunk(c).t_count;
      ulysses_->qkv_seq_to_heads_finish_chunk(ctx_, c, A.dqkv_local);
      Tensor dq = dqkv_rows.rows(r, n);  // [n, Hq + 2Hkv, d]
      if (s.rope) ops::rope_backward(ctx_, dq, 0, s.Hq + s.Hkv, A.positions.rows(r, n), s.rope_theta);
      matmul_backward(A.dln.rows(r, n), Tensor(), Tensor(), dq.reshape({n, qkv_width}), a.ln1.rows(r, n), p.qkvw());
    }
    matmul_backward(Tensor(), g.qkvw(), g.qkvb(), A.dqkv_local.reshape({BT, qkv_width}), a.ln1, p.qkvw());
  }
}

// residual3 = residual2 + W2 · gelu(W1 · LN2(residual2)), chunk by chunk; leaves d(LN2 out) in
// dln. A tiled MLP recomputes each chunk's fch and gelu first (they were not kept); selective
// recompute its gelu, through the same GEMM: on cuda the GELU comes out of the GEMM's epilogue,
// and only that op gives bitwise the GELU the forward used (ops.h, matmul_gelu_forward).
void GPT::mlp_backward(Layer& a, int l) {
  Activations& A = *act_;
  LayerTensors p = layer_params(l);
  LayerTensors g = layer_grads(l);
  const int64_t BT = run_.rows(), chunk = run_.mlp_chunk();
  const bool tiled = run_.mlp_tiled();
  ops::fill_zero(ctx_, A.dln);
  for (int64_t r = 0; r < BT; r += chunk) {
    const int64_t n = std::min(chunk, BT - r);
    Tensor fch = a.fch.rows(tiled ? 0 : r, n), gelu = a.fch_gelu.rows(0, n), ln2 = a.ln2.rows(r, n);
    if (tiled || run_.recompute == Recompute::selective) {
      counting_ = false;
      matmul_gelu_forward(gelu, fch, ln2, p.fcw(), p.fcb());
      counting_ = true;
    }
    Tensor dgelu = A.dfch_gelu.rows(0, n), dfch = A.dfch.rows(0, n);
    ops::fill_zero(ctx_, dgelu);
    matmul_backward(dgelu, g.fcprojw(), g.fcprojb(), A.dres.rows(r, n), gelu, p.fcprojw());
    ops::fill_zero(ctx_, dfch);
    ops::gelu_backward(ctx_, dfch, fch, dgelu);
    matmul_backward(A.dln.rows(r, n), g.fcw(), g.fcb(), dfch, ln2, p.fcw());
  }
}

void GPT::backward() {
  const GPTShape& s = shape_;
  Activations& A = *act_;
  auto& p = params_;
  auto& g = grads_;
  // dres: the gradient of the residual stream, walked from the top down
  ops::fill_zero(ctx_, A.dres);
  const Tensor top = s.L > 0 ? A.layers[size_t(s.L - 1)].residual3 : A.encoded;
  ops::layernorm_backward(ctx_, A.dres, g.lnfw(), g.lnfb(), A.dlnf, top, p.lnfw(), A.lnf_mean, A.lnf_rstd);
  for (int l = s.L - 1; l >= 0; --l) {
    if (hooks_) hooks_->before_backward(l);
    // offloaded checkpoints: wait for this layer's input, prefetch the next one's
    if (offload_) offload_->before_backward(l, ctx_.stream(), l >= 2 ? A.layers[size_t(l - 2)].residual3 : Tensor());
    LayerTensors lp = layer_params(l), lg = layer_grads(l);
    Layer& a = A.layers[size_t(l)];
    const Tensor x = l > 0 ? A.layers[size_t(l - 1)].residual3 : A.encoded;
    if (run_.recompute == Recompute::full) {
      // the layer's forward again, from its stored input, into the shared workspace (the same
      // ops on the same inputs: bitwise the activations of the first pass)
      counting_ = false;
      block_forward(a, l, x, /*recompute=*/true);
      counting_ = true;
    } else if (run_.recompute == Recompute::selective) {
      // bitwise the ln2 of the forward's residual_layernorm_forward (ops.h)
      ops::layernorm_forward(ctx_, a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, lp.ln2w(), lp.ln2b());
    }
    mlp_backward(a, l);
    ops::layernorm_backward(ctx_, A.dres, lg.ln2w(), lg.ln2b(), A.dln, a.residual2, lp.ln2w(), a.ln2_mean,
                            a.ln2_rstd);
    // attention block: residual2 = x + Wo · attention(LN1(x)); leaves d(LN1 out) in dln
    if (run_.recompute != Recompute::none)  // ln1 and ln2 share one buffer: it holds ln2 now
      ops::layernorm_forward(ctx_, a.ln1, a.ln1_mean, a.ln1_rstd, x, lp.ln1w(), lp.ln1b());
    attention_backward(a, l, A.dres);
    ops::layernorm_backward(ctx_, A.dres, lg.ln1w(), lg.ln1b(), A.dln, x, lp.ln1w(), a.ln1_mean, a.ln1_rstd);
    if (hooks_) hooks_->after_backward(l);
  }
  ops::embedding_backward(ctx_, g.wte(), s.rope ? Tensor() : g.wpe(), A.dres, A.tokens, A.positions);
}

double GPT::forward_backward(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count) {
  ULYSSES_ASSERT(!grads_flat_.empty(), "this model instance has no gradients");
  *count = check_inputs(tokens, targets, positions);
  forward(tokens, positions, /*offload=*/true);
  classifier(targets, /*backward=*/true);
  backward();
  // the micro-batch's one host synchronisation, after everything is enqueued (backward does not
  // touch the losses): the sum of the losses in a fixed order
  return ops::sum(ctx_, act_->losses);
}

double GPT::forward_loss(const int32_t* tokens, const int32_t* targets, const int32_t* positions, int64_t* count) {
  *count = check_inputs(tokens, targets, positions);
  forward(tokens, positions);
  classifier(targets, /*backward=*/false);
  return ops::sum(ctx_, act_->losses);  // synchronises (cuda)
}

void GPT::forward_logits(const int32_t* tokens, const int32_t* positions, int64_t row, float* logits) {
  check_inputs(tokens, nullptr, positions);
  ULYSSES_ASSERT(row >= 0 && row < run_.rows(), "forward_logits: row {} of {}", row, run_.rows());
  forward(tokens, positions);
  logits_of_row(row, logits);
}

void GPT::forward_all_logits(const int32_t* tokens, const int32_t* positions, float* logits) {
  check_inputs(tokens, nullptr, positions);
  forward(tokens, positions);
  for (int64_t row = 0; row < run_.rows(); ++row) logits_of_row(row, logits + row * shape_.Vp);
}

void GPT::logits_of_row(int64_t row, float* logits) {
  Tensor out = act_->logits.rows(0, 1);  // [1, Vp], the activation dtype
  ops::matmul_forward(ctx_, out, act_->lnf.rows(row, 1), params_.wte(), Tensor());
  Tensor row_f32 = out;
  if (device_ == Device::cuda) {
    row_f32 = act_->logits_row;  // [Vp] f32 on the device
    ops::cast(ctx_, row_f32, out);
  }
  ops::copy(ctx_, Tensor(logits, {shape_.Vp}, DType::f32, Device::cpu), row_f32);
  ops::synchronize(ctx_);  // the host row is valid only after this
}

}  // namespace ulysses
