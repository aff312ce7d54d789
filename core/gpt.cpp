// GPT forward and backward for one rank of a DP × SP layout, on cpu (fp32) or cuda (bf16
// compute, fp32 master weights and gradients); see core/gpt.h. This file is the model as the
// paper's figure draws it, read top to bottom:
//   attention_forward   qkv GEMM, RoPE, all-to-all #1, causal attention, all-to-all #2, out GEMM
//   mlp_forward         fc GEMM with its GELU epilogue, fcproj GEMM, in row chunks
//   block_forward       LN1 -> attention -> residual + LN2 -> MLP
//   forward             embedding, the blocks, the final LayerNorm
//   classifier          the LM head (tied to wte) and the cross-entropy, in row chunks
//   attention_backward, mlp_backward, backward: the mirror image, from the top layer down
//   check_inputs, forward_backward, forward_loss, forward_logits, forward_all_logits: the entry
//   points
// and, last, the matmul wrappers that count FLOPs. What the model holds and where is elsewhere:
// core/gpt_params.cpp (parameters, init), core/gpt_layout.cpp (the activation arena per
// recompute mode, the constructor), core/gpt_offload.cpp (pinned staging, offloaded checkpoints),
// core/gpt_internal.h (the private structs).
#include "core/gpt.h"

#include <algorithm>

#include "core/base/error.h"
#include "core/gpt_internal.h"

namespace ulysses {

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

// ---- the entry points ---------------------------------------------------------------------------

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

// ---- the op calls that do FLOPs, counted (OpCounts) ---------------------------------------------

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

}  // namespace ulysses
