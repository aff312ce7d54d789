// The fp32 CPU reference of every op: one function per op, one .cpp per op in kernels/cpu/.
// This is what CI runs and what the CUDA kernels and the sequence-parallel runs are checked
// against. All tensors are contiguous row-major fp32 unless said otherwise.
//
// Gradient conventions (the same for every backend):
//   - parameter gradients (dweight, dbias, dwte, dwpe, ...) ACCUMULATE (+=): gradient
//     accumulation over micro-steps relies on it;
//   - activation gradients named `dinp` ACCUMULATE (+=) as well, because several consumers feed
//     the same activation (the residual stream); callers zero them once per micro-step;
//   - outputs of forward ops are OVERWRITTEN.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ulysses::cpu {

// ---- embedding ------------------------------------------------------------------------------
// out[r, :] = wte[tokens[r], :] + (wpe ? wpe[positions[r], :] : 0)     r in [0, rows)
// positions are global positions (under sequence parallelism a rank's slice starts at r*N/P).
void embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                       const float* wte, const float* wpe, int64_t rows, int C);
// dwte[tokens[r]] += dout[r]; dwpe[positions[r]] += dout[r] (dwpe may be null)
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        const int32_t* positions, int64_t rows, int C);

// ---- layernorm (eps 1e-5, biased variance) ---------------------------------------------------
// out = (inp - mean) * rstd * weight + bias; mean, rstd: [rows] saved for backward.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                       const float* weight, const float* bias, int64_t rows, int C);
// dinp += ..., dweight += ..., dbias += ...
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean,
                        const float* rstd, int64_t rows, int C);

// ---- matmul through the CPU BLAS ---------------------------------------------------------------
// out[M, OC] = inp[M, IC] · weight[OC, IC]^T + bias[OC]   (bias may be null)
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t M, int IC, int OC);
// dinp[M, IC] += dout · weight;  dweight[OC, IC] += dout^T · inp;  dbias[OC] += sum_rows dout.
// dinp, dweight or dbias may be null (not needed).
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t M, int IC, int OC);

// ---- GELU (tanh approximation, as GPT-2) ------------------------------------------------------
void gelu_forward(float* out, const float* inp, int64_t n);
// dinp += gelu'(inp) * dout
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);

// ---- residual -----------------------------------------------------------------------------------
// out = a + b (out may alias a or b)
void residual_forward(float* out, const float* a, const float* b, int64_t n);

// ---- rotary position embedding (GPT-NeoX / Llama "rotate half" convention) --------------------
// x: [rows, n_heads, d] viewed with a row stride of `row_stride` floats (so q or k can be rotated
// inside a packed qkv buffer). For each row r with global position p = positions[r], head h and
// i in [0, d/2): theta_i = p * base^(-2i/d);
//   (x[i], x[i + d/2]) <- (x[i] cos - x[i+d/2] sin, x[i] sin + x[i+d/2] cos)   in place.
void rope_forward(float* x, const int32_t* positions, int64_t rows, int n_heads, int d,
                  int64_t row_stride, float base);
// The transpose (rotation by -theta), applied in place to the gradient.
void rope_backward(float* dx, const int32_t* positions, int64_t rows, int n_heads, int d,
                   int64_t row_stride, float base);

// ---- causal attention (flash-style: tiles + online softmax, no N×N buffer) --------------------
// Layout: the packed qkv buffer of one sequence group, [B, N, Hq + 2*Hkv, d]:
//   q = qkv[b, t, 0 : Hq], k = qkv[b, t, Hq : Hq+Hkv], v = qkv[b, t, Hq+Hkv : Hq+2Hkv].
// Query head h attends with key/value head h / (Hq / Hkv) (GQA; Hq % Hkv == 0).
// out: [B, N, Hq, d]; lse: [B, Hq, N], the log-sum-exp of each row's scaled scores, saved for
// backward. Scale 1/sqrt(d). Position t attends to positions 0..t (causal).
// scratch: scratch_floats floats (any contents) for the keys and values rearranged once per call
// and each thread's tiles, at least attention_forward_scratch_floats(..., threads) with threads
// the calling thread's omp_get_max_threads() (checked); or nullptr, and the call allocates its
// own (tests, benchmarks; the model passes its context's scratch so that a step does not
// allocate).
size_t attention_forward_scratch_floats(int B, int N, int Hq, int Hkv, int d, int threads);
void attention_forward(float* out, float* lse, const float* qkv, int B, int N, int Hq, int Hkv,
                       int d, float* scratch = nullptr, size_t scratch_floats = 0);
// dqkv (same layout as qkv) is OVERWRITTEN (not accumulated: attention is its only consumer).
// Recomputes the probabilities tile by tile from q, k and lse; no N×N buffer. scratch as for
// the forward, attention_backward_scratch_floats(..., threads) floats.
size_t attention_backward_scratch_floats(int B, int N, int Hq, int Hkv, int d, int threads);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int N, int Hq, int Hkv, int d,
                        float* scratch = nullptr, size_t scratch_floats = 0);

// ---- fused softmax + cross-entropy over one chunk of rows -------------------------------------
// logits: [rows, Vp] (only the first V columns are real; the padding is ignored and its
// gradient set to 0). For each row with targets[r] >= 0:
//   losses[r] = logsumexp(logits[r, :V]) - logits[r, targets[r]]
//   logits[r, :] <- (softmax(logits[r, :V]) - onehot(targets[r])) * grad_scale   (in place)
// rows with targets[r] < 0 are ignored: losses[r] = 0 and their gradient row is 0.
// grad_scale = 0 skips the gradient (validation): losses are written, logits are left untouched.
// losses are per row and unnormalised (fold 1/num_tokens into grad_scale). Never stores the
// probabilities separately.
void crossentropy_forward_backward(float* losses, float* logits, const int32_t* targets,
                                   int64_t rows, int V, int Vp, float grad_scale);

// ---- optimizer ----------------------------------------------------------------------------------
// AdamW with decoupled weight decay; step t starts at 1. For each i:
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²;  mhat = m / (1-b1^t);  vhat = v / (1-b2^t)
//   param -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * param)
// grad is multiplied by grad_scale first (clipping / averaging folded in).
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t);
// sum of squares in double (deterministic for a given n and thread count).
double sum_squares(const float* x, int64_t n);

}  // namespace ulysses::cpu

// ---- Ulysses layout transforms (the pack/unpack around the two all-to-alls) -------------------
// Section owned by the sequence-parallel code (comm/ulysses.*); kept here so every op has its
// signature in this header. P peers, T = N/P local tokens, d head dim. A "head map" is, for each
// peer p, the list of head indices heads[head_offsets[p] .. head_offsets[p+1]) it takes.
namespace ulysses::cpu {

// Gather heads per peer: src [B, T, Htot, d] -> dst = P blocks one after another, block p is
// [B, T, n_p, d] with the heads heads[head_offsets[p] + j], j < n_p. Only the token rows
// b in [b_begin, b_end), t in [t_begin, t_end) are moved (the rest of dst is left as it is), in
// the same places as a whole call (0, B, 0, T) puts them: the chunked all-to-alls pack and unpack
// one chunk of rows at a time.
void ulysses_pack_heads(float* dst, const float* src, const int32_t* heads,
                        const int64_t* head_offsets, int P, int B, int T, int Htot, int d, int b_begin,
                        int b_end, int t_begin, int t_end);
// The reverse: P blocks as above -> dst [B, T, Htot, d]. With accumulate, dst[.., heads[j], ..]
// += block values (a head listed for several peers sums their contributions: the backward of a
// replicated key/value head); without, it is assigned (each head must then be listed once).
// Rows b in [b_begin, b_end), t in [t_begin, t_end) only, as for pack.
void ulysses_unpack_heads(float* dst, const float* src, const int32_t* heads,
                          const int64_t* head_offsets, int P, int B, int T, int Htot, int d,
                          bool accumulate, int b_begin, int b_end, int t_begin, int t_end);
// Split the sequence: src [B, P*T, h, d] -> P blocks, block s = [B, T, h, d] holding tokens
// [s*T, (s+1)*T).
void ulysses_pack_sequence(float* dst, const float* src, int P, int B, int T, int h, int d);
// Gather the sequence: P blocks [B, T, h, d] (block s from peer s) -> dst [B, P*T, h, d].
void ulysses_unpack_sequence(float* dst, const float* src, int P, int B, int T, int h, int d);

}  // namespace ulysses::cpu
