// What a GPT holds and where, and the constructor that allocates it (core/gpt.h):
//   runtime.recompute's names (parse_recompute, recompute_name);
//   the activation arena's layout per recompute mode, MLP tiling and offload (GPT::lay_out and
//   its steps, GPT::ActivationPlanner), computed without allocating for the memory estimate
//   (GPT::activation_layout);
//   GPT::GPT in named steps: checks, parameter arenas (allocate_parameters, core/gpt_params.cpp),
//   the Ulysses all-to-alls and this rank's heads (set_up_ulysses), the activation arena
//   (allocate_activations), the pinned input staging and offloaded checkpoints (core/gpt_offload.cpp).
#include <algorithm>
#include <memory>

#include "core/base/error.h"
#include "core/gpt_internal.h"

namespace ulysses {

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

void zero_arena(ops::Context& ctx, const Arena& arena) {
  if (arena.bytes() == 0) return;
  ops::fill_zero(ctx, Tensor(arena.base(), {int64_t(arena.bytes() / 4)}, DType::f32, arena.device()));
}

// ---- the activation arena's layout --------------------------------------------------------------

void GPT::ActivationPlanner::want(Tensor& t, const char* name, const char* kind, int layer,
                                  std::initializer_list<int64_t> dims, DType dt) {
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
}

void GPT::ActivationPlanner::inputs(Activations& A) {
  const int64_t BT = run.rows();
  want(A.tokens, "tokens", "inputs", -1, {BT}, DType::i32);
  want(A.targets, "targets", "inputs", -1, {BT}, DType::i32);
  want(A.positions, "positions", "inputs", -1, {BT}, DType::i32);
  want(A.encoded, "encoded", "layer", -1, {BT, s.C}, act());
  A.layers.assign(size_t(s.L), Layer{});
}

// The shared buffers first: the Layer fields that are not stored per layer alias them (`work`,
// `ln_work`, the checkpoint slots).
void GPT::ActivationPlanner::shared_workspace(Activations& A) {
  const int B = run.B, N = run.N, P = run.P, C = s.C, d = s.d, hloc = hq + 2 * hkv;
  const int64_t BT = run.rows(), chunk = run.mlp_chunk();
  const Recompute rc = run.recompute;
  const DType f32 = DType::f32;
  Layer& w = A.work;
  if (rc == Recompute::full) {
    want(w.ln1, "ln1/ln2", "recompute", -1, {BT, C}, act());
    want(w.ln1_mean, "ln1_mean", "recompute", -1, {BT}, f32);
    want(w.ln1_rstd, "ln1_rstd", "recompute", -1, {BT}, f32);
    want(w.qkv_full, "qkv", "recompute", -1, {B, N, hloc, d}, act());
    want(w.att_full, "att", "recompute", -1, {B, N, hq, d}, act());
    want(w.lse, "lse", "recompute", -1, {B, hq, N}, f32);
    if (P > 1) want(w.att, "att_local", "recompute", -1, {BT, C}, act());
    want(w.residual2, "residual2", "recompute", -1, {BT, C}, act());
    w.ln2 = w.ln1;
    want(w.ln2_mean, "ln2_mean", "recompute", -1, {BT}, f32);
    want(w.ln2_rstd, "ln2_rstd", "recompute", -1, {BT}, f32);
  } else if (rc == Recompute::selective) {
    want(A.ln_work, "ln1/ln2", "recompute", -1, {BT, C}, act());
  }
  if (rc == Recompute::full && run.offload_checkpoints) {
    A.num_checkpoint_slots = std::min(s.L, kCheckpointSlots);
    for (int k = 0; k < A.num_checkpoint_slots; ++k)
      want(A.checkpoint_slots[size_t(k)], "residual3 slot", "checkpoint_slots", -1, {BT, C}, act());
  }
  // fch and fch_gelu [chunk, 4C] are shared by the layers whenever backward recomputes them:
  // tiled (per chunk), full (the layer's forward) and selective (mlp_backward re-runs the fc GEMM
  // with its GELU epilogue, which writes both: see there)
  if (shared_mlp()) {
    want(w.fch, "fch", "recompute", -1, {chunk, 4 * C}, act());
    want(w.fch_gelu, "fch_gelu", "recompute", -1, {chunk, 4 * C}, act());
  }
}

void GPT::ActivationPlanner::layer(Activations& A, int l) {
  const int B = run.B, N = run.N, P = run.P, C = s.C, d = s.d, hloc = hq + 2 * hkv;
  const int64_t BT = run.rows();
  const Recompute rc = run.recompute;
  const DType f32 = DType::f32;
  const Layer& w = A.work;
  Layer& a = A.layers[size_t(l)];
  if (rc == Recompute::full) {
    a = w;
    if (run.offload_checkpoints)
      a.residual3 = A.checkpoint_slots[size_t(l % A.num_checkpoint_slots)];  // re-pointed by the constructor
    else
      want(a.residual3, "residual3", "layer", l, {BT, C}, act());
    return;
  }
  if (rc == Recompute::selective) {
    a.ln1 = a.ln2 = A.ln_work;
  } else {
    want(a.ln1, "ln1", "layer", l, {BT, C}, act());
  }
  want(a.ln1_mean, "ln1_mean", "attention_stats", l, {BT}, f32);
  want(a.ln1_rstd, "ln1_rstd", "attention_stats", l, {BT}, f32);
  want(a.qkv_full, "qkv", "layer", l, {B, N, hloc, d}, act());
  want(a.att_full, "att", "layer", l, {B, N, hq, d}, act());
  want(a.lse, "lse", "attention_stats", l, {B, hq, N}, f32);
  if (P > 1) want(a.att, "att_local", "layer", l, {BT, C}, act());
  want(a.residual2, "residual2", "layer", l, {BT, C}, act());
  if (rc != Recompute::selective) want(a.ln2, "ln2", "layer", l, {BT, C}, act());
  want(a.ln2_mean, "ln2_mean", "attention_stats", l, {BT}, f32);
  want(a.ln2_rstd, "ln2_rstd", "attention_stats", l, {BT}, f32);
  if (shared_mlp()) {
    a.fch = w.fch;
    a.fch_gelu = w.fch_gelu;
  } else {
    want(a.fch, "fch", "layer", l, {BT, 4 * C}, act());
    want(a.fch_gelu, "fch_gelu", "layer", l, {BT, 4 * C}, act());
  }
  want(a.residual3, "residual3", "layer", l, {BT, C}, act());
}

void GPT::ActivationPlanner::lm_head(Activations& A) {
  const int64_t BT = run.rows();
  want(A.lnf, "lnf", "lm_head", -1, {BT, s.C}, act());
  want(A.lnf_mean, "lnf_mean", "lm_head", -1, {BT}, DType::f32);
  want(A.lnf_rstd, "lnf_rstd", "lm_head", -1, {BT}, DType::f32);
  want(A.losses, "losses", "lm_head", -1, {BT}, DType::f32);
  want(A.logits, "logits", "lm_head", -1, {run.lm_head_chunk(), s.Vp}, act());
  if (device == Device::cuda) want(A.logits_row, "logits_row", "lm_head", -1, {s.Vp}, DType::f32);
}

void GPT::ActivationPlanner::scratch(Activations& A) {
  const int B = run.B, N = run.N, P = run.P, C = s.C, d = s.d, Htot = s.qkv_heads(), hloc = hq + 2 * hkv;
  const int64_t BT = run.rows(), chunk = run.mlp_chunk();
  if (P > 1) {
    want(A.qkv_local, "qkv_local", "comm", -1, {B, run.T(), Htot, d}, act());
    want(A.dqkv_local, "dqkv_local", "comm", -1, {B, run.T(), Htot, d}, act());
    want(A.sp_send, "all_to_all_send", "comm", -1, {int64_t(sp_scratch)}, act());
    want(A.sp_recv, "all_to_all_recv", "comm", -1, {int64_t(sp_scratch)}, act());
  }
  want(A.dqkv_full, "dqkv", "backward", -1, {B, N, hloc, d}, act());
  want(A.datt_full, "datt", "backward", -1, {B, N, hq, d}, act());
  want(A.dres, "dresidual", "backward", -1, {BT, C}, act());
  want(A.dlnf, "dlnf", "backward", -1, {BT, C}, act());
  want(A.dln, "dln", "backward", -1, {BT, C}, act());
  if (P > 1) want(A.datt, "datt_local", "backward", -1, {BT, C}, act());
  want(A.dfch_gelu, "dfch_gelu", "backward", -1, {chunk, 4 * C}, act());
  want(A.dfch, "dfch", "backward", -1, {chunk, 4 * C}, act());
}

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
  ActivationPlanner plan{s, run, hq, hkv, sp_scratch, device, arena, list, slots};
  plan.inputs(A);
  plan.shared_workspace(A);
  for (int l = 0; l < s.L; ++l) plan.layer(A, l);
  plan.lm_head(A);
  plan.scratch(A);
}

std::vector<ActivationBuffer> GPT::activation_layout(const GPTShape& s, const GPTRunShape& run, int hq, int hkv,
                                                     size_t sp_scratch_elements, Device device) {
  Activations A;
  Arena arena("activations (layout only)", Device::cpu);  // reserve() only: nothing is allocated
  std::vector<ActivationBuffer> list;
  lay_out(s, run, hq, hkv, sp_scratch_elements, device, A, arena, &list, nullptr);
  return list;
}

// ---- the constructor ----------------------------------------------------------------------------

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
  ULYSSES_ASSERT(run.N % run.P == 0, "N = {} not divisible by P = {}", run.N, run.P);
  if (run.N > s.maxT && !s.rope)
    throw_user_error("train.seq_len = {} exceeds model.max_seq_len = {} (the learned position table)", run.N, s.maxT);
  allocate_parameters(shared_params);
  set_up_ulysses();
  allocate_activations();
  const int64_t BT = run.rows();
  if (device == Device::cuda) staging_ = std::make_unique<HostStaging>(BT);
  if (run.offload_checkpoints) offload_ = std::make_unique<CheckpointOffload>(s.L, BT * s.C * 2);
}

// The all-to-alls and this rank's heads: all of them (Hq, Hkv) when P == 1.
void GPT::set_up_ulysses() {
  const GPTShape& s = shape_;
  const int B = run_.B, N = run_.N, P = run_.P, T = run_.T();
  hq_ = s.Hq;
  hkv_ = s.Hkv;
  if (P > 1) {
    ULYSSES_ASSERT(seq_ && seq_->size() == P, "P = {} needs a sequence communicator of that size", P);
    // the all-to-alls are enqueued after the model's kernels on ctx_'s stream (device
    // communicators); on cuda the head maps are copied to the device here, once
    seq_->set_stream(ctx_.stream());
    if (run_.all_to_all_chunks < 1 || run_.all_to_all_chunks > T)
      throw_user_error("runtime.all_to_all_chunks = {} must be in [1, T] with T = train.seq_len / parallel.sequence "
                       "= {} / {} = {} local tokens",
                       run_.all_to_all_chunks, N, P, T);
    ulysses_ = std::make_unique<UlyssesAllToAll>(seq_, plan_ulysses_heads(s.Hq, s.Hkv, P), B, T, s.d, &ctx_,
                                                 run_.all_to_all_chunks);
    hq_ = ulysses_->plan().local_q_heads(seq_->rank());
    hkv_ = ulysses_->plan().local_kv_heads(seq_->rank());
  }
}

// Reserves everything (lay_out), allocates once, then takes the views.
void GPT::allocate_activations() {
  const int P = run_.P;
  const int64_t BT = run_.rows(), C = shape_.C;
  act_ = std::make_unique<Activations>();
  Activations& A = *act_;
  std::vector<std::pair<Tensor*, size_t>> slots;
  lay_out(shape_, run_, hq_, hkv_, P > 1 ? ulysses_->scratch_elements() : 0, device_, A, act_arena_, nullptr, &slots);
  act_arena_.allocate(/*zero=*/false);
  zero_arena(ctx_, act_arena_);
  for (auto& [t, offset] : slots) {
    t->data = static_cast<char*>(act_arena_.base()) + offset;
    t->device = device_;
    ULYSSES_ASSERT(offset + t->bytes() <= act_arena_.bytes(), "activation overrun");
  }
  // views that alias a shared buffer were copied from it before it had memory: copy them again
  if (run_.recompute == Recompute::full) A.work.ln2 = A.work.ln1;
  const bool shared_mlp = run_.recompute != Recompute::none || run_.mlp_tiled();
  for (size_t l = 0; l < A.layers.size(); ++l) {
    Layer& a = A.layers[l];
    if (run_.recompute == Recompute::full) {
      const Tensor own = run_.offload_checkpoints ? A.checkpoint_slots[l % size_t(A.num_checkpoint_slots)] : a.residual3;
      a = A.work;
      a.residual3 = own;
    } else if (run_.recompute == Recompute::selective) {
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
}

// The all-to-alls first: chunked exchanges still in flight (an error unwound past their waits)
// read and write the activation arena's scratch, so they complete (or are waited for) before
// the arena is freed.
GPT::~GPT() { ulysses_.reset(); }

size_t GPT::activation_bytes() const { return act_arena_.bytes(); }

}  // namespace ulysses
