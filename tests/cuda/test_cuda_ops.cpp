// Every CUDA op against the fp32 CPU reference (ggml test-backend-ops style): a table of cases
// (op, shape - odd ones included, tolerance per output) and one driver. Inputs are random and
// never zero, rounded to bf16 before both sides see them, so the comparison measures only the
// kernel's arithmetic; forward outputs are NaN-poisoned first (an unwritten element fails),
// accumulated outputs start from random values (so += is checked), and NaN never passes.
// Error = max |cuda - cpu| / max |cpu| per output. Deterministic ops are also run twice and
// compared bit for bit. Without a CUDA device the executable prints "SKIPPED: no CUDA device"
// and exits with 77 (CTest reports it skipped).
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_case.h"
#include "tests/cuda/cuda_test_util.h"

namespace {

using namespace ulysses;
using namespace ulysses::cuda::test;
using cuda::bf16;
using Vec = std::vector<float>;


struct Case {
  std::string name;
  std::function<Results()> run;
};

// Accumulating outputs are compared against the CPU starting from the same (bf16-rounded for
// bf16 buffers) random values.
void device_sync() { CUDA_CHECK(cudaDeviceSynchronize()); }

// ---- embedding --------------------------------------------------------------------------------
Results embedding_case(int rows, int C, int V, int maxpos, bool with_wpe, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> tokens(rows), positions(rows);
  for (int r = 0; r < rows; ++r) {
    tokens[r] = rng.below(V);
    positions[r] = rng.below(maxpos);
  }
  const Vec wte = rounded_bf16(random_vector(rng, size_t(V) * C));
  const Vec wpe = rounded_bf16(random_vector(rng, size_t(maxpos) * C));
  const Vec dout = rounded_bf16(random_vector(rng, size_t(rows) * C));
  const Vec dwte0 = random_vector(rng, size_t(V) * C), dwpe0 = random_vector(rng, size_t(maxpos) * C);

  Vec out_ref(size_t(rows) * C), dwte_ref = dwte0, dwpe_ref = dwpe0;
  cpu::embedding_forward(out_ref.data(), tokens.data(), positions.data(), wte.data(), with_wpe ? wpe.data() : nullptr,
                         rows, C);
  cpu::embedding_backward(dwte_ref.data(), with_wpe ? dwpe_ref.data() : nullptr, dout.data(), tokens.data(),
                          positions.data(), rows, C);

  DeviceBuffer<int32_t> d_tok(tokens), d_pos(positions);
  DeviceBuffer<bf16> d_wte(wte), d_wpe(wpe), d_dout(dout), d_out(size_t(rows) * C);
  DeviceBuffer<float> d_dwte(dwte0), d_dwpe(dwpe0);
  const size_t scratch_bytes = cuda::embedding_backward_scratch_bytes(rows);
  DeviceBuffer<char> scratch(scratch_bytes);
  d_out.poison();
  cuda::embedding_forward(d_out.get(), d_tok.get(), d_pos.get(), d_wte.get(), with_wpe ? d_wpe.get() : nullptr, rows,
                          C, nullptr);
  cuda::embedding_backward(d_dwte.get(), with_wpe ? d_dwpe.get() : nullptr, d_dout.get(), d_tok.get(), d_pos.get(),
                           rows, C, V, maxpos, scratch.get(), scratch_bytes, nullptr);
  Results res{{"out", normalised_error(d_out.download(), out_ref), 1e-2},
              {"dwte", normalised_error(d_dwte.download(), dwte_ref), 1e-5}};
  if (with_wpe) res.push_back({"dwpe", normalised_error(d_dwpe.download(), dwpe_ref), 1e-5});
  // determinism: the same accumulation again from the same start gives the same bits
  const auto first = d_dwte.raw();
  d_dwte.upload(dwte0);
  cuda::embedding_backward(d_dwte.get(), nullptr, d_dout.get(), d_tok.get(), d_pos.get(), rows, C, V, maxpos,
                           scratch.get(), scratch_bytes, nullptr);
  const auto second = d_dwte.raw();
  res.push_back({"dwte bitwise repeat", std::memcmp(first.data(), second.data(), first.size() * 4) == 0 ? 0.0 : 1.0, 0.0});
  return res;
}

// ---- layernorm --------------------------------------------------------------------------------
Results layernorm_case(int rows, int C, bool fused, uint64_t seed) {
  Rng rng(seed);
  const size_t n = size_t(rows) * C;
  const Vec a = rounded_bf16(random_vector(rng, n, 2.0f)), b = rounded_bf16(random_vector(rng, n));
  const Vec w = rounded_bf16(random_vector(rng, C)), bias = rounded_bf16(random_vector(rng, C));
  Vec inp = a;
  if (fused)
    for (size_t i = 0; i < n; ++i) inp[i] = round_bf16(a[i] + b[i]);
  Vec out_ref(n), mean_ref(rows), rstd_ref(rows);
  cpu::layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), inp.data(), w.data(), bias.data(), rows, C);

  DeviceBuffer<bf16> d_a(a), d_b(b), d_w(w), d_bias(bias), d_out(n), d_res(n);
  DeviceBuffer<float> d_mean(rows), d_rstd(rows);
  d_out.poison(), d_res.poison(), d_mean.poison(), d_rstd.poison();
  if (fused)
    cuda::fused_residual_layernorm_forward(d_res.get(), d_out.get(), d_mean.get(), d_rstd.get(), d_a.get(), d_b.get(),
                                           d_w.get(), d_bias.get(), rows, C, nullptr);
  else
    cuda::layernorm_forward(d_out.get(), d_mean.get(), d_rstd.get(), d_a.get(), d_w.get(), d_bias.get(), rows, C,
                            nullptr);
  Results res{{"out", normalised_error(d_out.download(), out_ref), 1e-2},
              {"mean", normalised_error(d_mean.download(), mean_ref), 1e-5},
              {"rstd", normalised_error(d_rstd.download(), rstd_ref), 1e-5}};
  if (fused) res.push_back({"residual_out", normalised_error(d_res.download(), inp), 0.0});
  return res;
}

Results layernorm_backward_case(int rows, int C, uint64_t seed) {
  Rng rng(seed);
  const size_t n = size_t(rows) * C;
  const Vec inp = rounded_bf16(random_vector(rng, n, 2.0f)), dout = rounded_bf16(random_vector(rng, n));
  const Vec w = rounded_bf16(random_vector(rng, C)), bias = rounded_bf16(random_vector(rng, C));
  const Vec dinp0 = rounded_bf16(random_vector(rng, n)), dw0 = random_vector(rng, C), db0 = random_vector(rng, C);
  Vec out(n), mean(rows), rstd(rows);
  cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), bias.data(), rows, C);
  Vec dinp_ref = dinp0, dw_ref = dw0, db_ref = db0;
  cpu::layernorm_backward(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), inp.data(), w.data(), mean.data(),
                          rstd.data(), rows, C);

  DeviceBuffer<bf16> d_inp(inp), d_dout(dout), d_w(w), d_dinp(dinp0);
  DeviceBuffer<float> d_mean(mean), d_rstd(rstd), d_dw(dw0), d_db(db0);
  DeviceBuffer<char> scratch(cuda::layernorm_backward_scratch_bytes(C));
  cuda::layernorm_backward(d_dinp.get(), d_dw.get(), d_db.get(), d_dout.get(), d_inp.get(), d_w.get(), d_mean.get(),
                           d_rstd.get(), rows, C, scratch.get(), nullptr);
  return {{"dinp", normalised_error(d_dinp.download(), dinp_ref), 1e-2},
          {"dweight", normalised_error(d_dw.download(), dw_ref), 1e-4},
          {"dbias", normalised_error(d_db.download(), db_ref), 1e-4}};
}

// ---- matmul -----------------------------------------------------------------------------------
Results matmul_case(cuda::MatmulContext& ctx, int M, int IC, int OC, bool with_bias, bool with_gelu, uint64_t seed) {
  Rng rng(seed);
  const Vec inp = rounded_bf16(random_vector(rng, size_t(M) * IC));
  const Vec w = rounded_bf16(random_vector(rng, size_t(OC) * IC, 0.1f));
  const Vec bias = rounded_bf16(random_vector(rng, OC));
  Vec pre_ref(size_t(M) * OC), out_ref(size_t(M) * OC);
  cpu::matmul_forward(pre_ref.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, M, IC, OC);
  out_ref = pre_ref;
  if (with_gelu) cpu::gelu_forward(out_ref.data(), pre_ref.data(), int64_t(M) * OC);

  DeviceBuffer<bf16> d_inp(inp), d_w(w), d_bias(bias), d_out(size_t(M) * OC), d_pre(size_t(M) * OC);
  d_out.poison(), d_pre.poison();
  cuda::matmul_forward(ctx, d_out.get(), d_inp.get(), d_w.get(), with_bias ? d_bias.get() : nullptr, M, IC, OC, nullptr,
                       with_gelu ? d_pre.get() : nullptr);
  Results res{{"out", normalised_error(d_out.download(), out_ref), 1e-2}};
  if (with_gelu) res.push_back({"pre_gelu", normalised_error(d_pre.download(), pre_ref), 1e-2});
  return res;
}

Results matmul_backward_case(cuda::MatmulContext& ctx, int M, int IC, int OC, uint64_t seed) {
  Rng rng(seed);
  const Vec inp = rounded_bf16(random_vector(rng, size_t(M) * IC));
  const Vec w = rounded_bf16(random_vector(rng, size_t(OC) * IC, 0.1f));
  const Vec dout = rounded_bf16(random_vector(rng, size_t(M) * OC));
  const Vec dinp0 = rounded_bf16(random_vector(rng, size_t(M) * IC));
  const Vec dw0 = random_vector(rng, size_t(OC) * IC), db0 = random_vector(rng, OC);
  Vec dinp_ref = dinp0, dw_ref = dw0, db_ref = db0;
  cpu::matmul_backward(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), inp.data(), w.data(), M, IC, OC);

  DeviceBuffer<bf16> d_inp(inp), d_w(w), d_dout(dout), d_dinp(dinp0);
  DeviceBuffer<float> d_dw(dw0), d_db(db0);
  cuda::matmul_backward(ctx, d_dinp.get(), d_dw.get(), d_db.get(), d_dout.get(), d_inp.get(), d_w.get(), M, IC, OC,
                        nullptr);
  return {{"dinp", normalised_error(d_dinp.download(), dinp_ref), 1e-2},
          {"dweight", normalised_error(d_dw.download(), dw_ref), 1e-4},
          {"dbias", normalised_error(d_db.download(), db_ref), 1e-5}};
}

// ---- elementwise ------------------------------------------------------------------------------
Results elementwise_case(int64_t n, uint64_t seed) {
  Rng rng(seed);
  const Vec x = rounded_bf16(random_vector(rng, n, 3.0f)), y = rounded_bf16(random_vector(rng, n));
  const Vec d0 = rounded_bf16(random_vector(rng, n));
  Vec gelu_ref(n), res_ref(n), dgelu_ref = d0;
  cpu::gelu_forward(gelu_ref.data(), x.data(), n);
  cpu::gelu_backward(dgelu_ref.data(), x.data(), y.data(), n);
  cpu::residual_forward(res_ref.data(), x.data(), y.data(), n);

  DeviceBuffer<bf16> d_x(x), d_y(y), d_gelu(n), d_res(n), d_dgelu(d0), d_alias(x);
  d_gelu.poison(), d_res.poison();
  cuda::gelu_forward(d_gelu.get(), d_x.get(), n, nullptr);
  cuda::gelu_backward(d_dgelu.get(), d_x.get(), d_y.get(), n, nullptr);
  cuda::residual_forward(d_res.get(), d_x.get(), d_y.get(), n, nullptr);
  cuda::residual_forward(d_alias.get(), d_alias.get(), d_y.get(), n, nullptr);  // out aliases a
  return {{"gelu", normalised_error(d_gelu.download(), gelu_ref), 1e-2},
          {"gelu_backward", normalised_error(d_dgelu.download(), dgelu_ref), 1e-2},
          {"residual", normalised_error(d_res.download(), res_ref), 1e-2},
          {"residual in place", normalised_error(d_alias.download(), res_ref), 1e-2}};
}

Results cast_case(int64_t n, uint64_t seed) {
  Rng rng(seed);
  const Vec x = random_vector(rng, n, 100.0f);
  DeviceBuffer<float> d_x(x), d_back(n);
  DeviceBuffer<bf16> d_h(n);
  d_h.poison(), d_back.poison();
  cuda::cast_f32_to_bf16(d_h.get(), d_x.get(), n, nullptr);
  cuda::cast_bf16_to_f32(d_back.get(), d_h.get(), n, nullptr);
  return {{"f32->bf16", normalised_error(d_h.download(), rounded_bf16(x)), 0.0},
          {"bf16->f32", normalised_error(d_back.download(), rounded_bf16(x)), 0.0}};
}

// ---- rope ----------------------------------------------------------------------------------------
// Rotates the q heads [0, Hq) of a packed [rows, Hq + 2, d] buffer, forward and back.
Results rope_case(int rows, int Hq, int d, uint64_t seed) {
  Rng rng(seed);
  const int Htot = Hq + 2;
  const Vec x = rounded_bf16(random_vector(rng, size_t(rows) * Htot * d));
  std::vector<int32_t> pos(rows);
  for (int r = 0; r < rows; ++r) pos[r] = r * 9973 % 200000;  // up to 2e5: the fp64 angles matter
  Vec fwd_ref = x, bwd_ref = x;
  cpu::rope_forward(fwd_ref.data(), pos.data(), rows, Hq, d, int64_t(Htot) * d, 10000.0f);
  cpu::rope_backward(bwd_ref.data(), pos.data(), rows, Hq, d, int64_t(Htot) * d, 10000.0f);
  DeviceBuffer<bf16> d_f(x), d_b(x);
  DeviceBuffer<int32_t> d_pos(pos);
  cuda::rope_forward(d_f.get(), d_pos.get(), rows, Hq, d, int64_t(Htot) * d, 10000.0f, nullptr);
  cuda::rope_backward(d_b.get(), d_pos.get(), rows, Hq, d, int64_t(Htot) * d, 10000.0f, nullptr);
  return {{"forward", normalised_error(d_f.download(), fwd_ref), 1e-2},
          {"backward", normalised_error(d_b.download(), bwd_ref), 1e-2}};
}

// ---- attention ------------------------------------------------------------------------------------
Results attention_case(int B, int N, int Hq, int Hkv, int d, uint64_t seed) {
  Rng rng(seed);
  const int Htot = Hq + 2 * Hkv;
  const size_t n_qkv = size_t(B) * N * Htot * d, n_out = size_t(B) * N * Hq * d, n_lse = size_t(B) * Hq * N;
  const Vec qkv = rounded_bf16(random_vector(rng, n_qkv, 2.0f));
  const Vec dout = rounded_bf16(random_vector(rng, n_out));
  Vec out_ref(n_out), lse_ref(n_lse), dqkv_ref(n_qkv);
  cpu::attention_forward(out_ref.data(), lse_ref.data(), qkv.data(), B, N, Hq, Hkv, d);
  // the backward on both sides consumes the same (bf16-rounded) out and lse
  const Vec out_bf = rounded_bf16(out_ref);
  cpu::attention_backward(dqkv_ref.data(), dout.data(), qkv.data(), out_bf.data(), lse_ref.data(), B, N, Hq, Hkv, d);

  DeviceBuffer<bf16> d_qkv(qkv), d_out(n_out), d_dout(dout), d_out_bf(out_bf), d_dqkv(n_qkv);
  DeviceBuffer<float> d_lse(n_lse), d_lse_ref(lse_ref);
  const size_t scratch_bytes = cuda::attention_backward_scratch_bytes(B, N, Hq);
  DeviceBuffer<char> scratch(scratch_bytes);
  d_out.poison(), d_lse.poison(), d_dqkv.poison();
  cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), B, N, Hq, Hkv, d, nullptr);
  cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out_bf.get(), d_lse_ref.get(), B, N, Hq, Hkv, d,
                           scratch.get(), scratch_bytes, nullptr);
  const auto first = d_dqkv.raw();
  Results res{{"out", normalised_error(d_out.download(), out_ref), 1e-2},
              {"lse", normalised_error(d_lse.download(), lse_ref), 1e-4},
              {"dqkv", normalised_error(d_dqkv.download(), dqkv_ref), 2e-2}};
  d_dqkv.poison();
  cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out_bf.get(), d_lse_ref.get(), B, N, Hq, Hkv, d,
                           scratch.get(), scratch_bytes, nullptr);
  const auto second = d_dqkv.raw();
  res.push_back({"dqkv bitwise repeat", std::memcmp(first.data(), second.data(), first.size() * 2) == 0 ? 0.0 : 1.0, 0.0});
  return res;
}

// ---- cross-entropy --------------------------------------------------------------------------------
Results crossentropy_case(int rows, int V, int Vp, float grad_scale, uint64_t seed) {
  Rng rng(seed);
  const Vec logits = rounded_bf16(random_vector(rng, size_t(rows) * Vp, 4.0f));
  std::vector<int32_t> targets(rows);
  for (int r = 0; r < rows; ++r) targets[r] = r % 5 == 3 ? -1 : rng.below(V);
  Vec grad_ref = logits, loss_ref(rows);
  cpu::crossentropy_forward_backward(loss_ref.data(), grad_ref.data(), targets.data(), rows, V, Vp, grad_scale);
  DeviceBuffer<bf16> d_logits(logits);
  DeviceBuffer<float> d_loss(rows);
  DeviceBuffer<int32_t> d_t(targets);
  d_loss.poison();
  cuda::crossentropy_forward_backward(d_loss.get(), d_logits.get(), d_t.get(), rows, V, Vp, grad_scale, nullptr);
  return {{"losses", normalised_error(d_loss.download(), loss_ref), 1e-4},
          {grad_scale != 0 ? "gradient" : "logits untouched", normalised_error(d_logits.download(), grad_ref), 1e-2}};
}

// ---- optimizer, norms ---------------------------------------------------------------------------
template <typename G>
Results adamw_case(int64_t n, uint64_t seed) {
  Rng rng(seed);
  const Vec p0 = random_vector(rng, n), m0 = random_vector(rng, n, 0.01f);
  Vec v0 = random_vector(rng, n, 0.01f);
  for (auto& x : v0) x = std::fabs(x);
  Vec g = random_vector(rng, n);
  if (std::is_same_v<G, bf16>) g = rounded_bf16(g);
  Vec p_ref = p0, m_ref = m0, v_ref = v0;
  const int t = 3;
  cpu::adamw_update(p_ref.data(), g.data(), m_ref.data(), v_ref.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, t);
  DeviceBuffer<float> d_p(p0), d_m(m0), d_v(v0);
  DeviceBuffer<G> d_g(g);
  DeviceBuffer<bf16> d_pb(n);
  d_pb.poison();
  cuda::adamw_update(d_p.get(), d_pb.get(), d_g.get(), d_m.get(), d_v.get(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, t,
                     nullptr);
  return {{"master", normalised_error(d_p.download(), p_ref), 1e-6},
          {"m", normalised_error(d_m.download(), m_ref), 1e-6},
          {"v", normalised_error(d_v.download(), v_ref), 1e-6},
          {"bf16 copy", normalised_error(d_pb.download(), rounded_bf16(p_ref)), 1e-2}};
}

Results sum_squares_case(int64_t n, uint64_t seed) {
  Rng rng(seed);
  const Vec x = rounded_bf16(random_vector(rng, n));
  const double ref = cpu::sum_squares(x.data(), n);
  DeviceBuffer<float> d_x(x);
  DeviceBuffer<bf16> d_xb(x);
  DeviceBuffer<double> d_out(2), scratch(cuda::kSumSquaresBlocks);
  d_out.poison();
  cuda::sum_squares(d_out.get(), d_x.get(), n, scratch.get(), nullptr);
  cuda::sum_squares(d_out.get() + 1, d_xb.get(), n, scratch.get(), nullptr);
  const auto got = d_out.raw();
  double repeat_diff = 0.0;
  cuda::sum_squares(d_out.get(), d_x.get(), n, scratch.get(), nullptr);
  if (d_out.raw()[0] != got[0]) repeat_diff = 1.0;
  auto rel = [&](double v) { return std::isfinite(v) ? std::fabs(v - ref) / ref : 1e300; };
  return {{"fp32 input", rel(got[0]), 1e-12}, {"bf16 input", rel(got[1]), 1e-12}, {"bitwise repeat", repeat_diff, 0.0}};
}

// ---- Ulysses layout transforms ------------------------------------------------------------------
// P peers; peer p takes q heads [p*Hq/P, ..) and the kv head(s) of its group (replicated when
// Hkv < P, so the accumulate path of unpack_heads sums copies).
template <typename T>
Results layout_case(int P, int B, int T_, int Hq, int Hkv, int d, uint64_t seed) {
  Rng rng(seed);
  const int Htot = Hq + 2 * Hkv;
  std::vector<int32_t> heads;
  std::vector<int64_t> offsets{0};
  for (int p = 0; p < P; ++p) {
    for (int h = p * Hq / P; h < (p + 1) * Hq / P; ++h) heads.push_back(h);
    const int kv = Hkv >= P ? -1 : p * Hkv / P;
    if (kv >= 0) {
      heads.push_back(Hq + kv);
      heads.push_back(Hq + Hkv + kv);
    } else {
      for (int g = p * Hkv / P; g < (p + 1) * Hkv / P; ++g) heads.push_back(Hq + g);
      for (int g = p * Hkv / P; g < (p + 1) * Hkv / P; ++g) heads.push_back(Hq + Hkv + g);
    }
    offsets.push_back(int64_t(heads.size()));
  }
  const int64_t total = offsets.back();
  const bool replicated = Hkv < P;
  const DType dt = std::is_same_v<T, bf16> ? DType::bf16 : DType::f32;
  const double tol_sum = std::is_same_v<T, bf16> ? 1e-2 : 1e-6;

  const size_t n_src = size_t(B) * T_ * Htot * d, n_packed = size_t(B) * T_ * total * d;
  const Vec src = rounded_bf16(random_vector(rng, n_src));
  Vec packed_ref(n_packed);
  cpu::ulysses_pack_heads(packed_ref.data(), src.data(), heads.data(), offsets.data(), P, B, T_, Htot, d, 0, B, 0, T_);
  const Vec base = rounded_bf16(random_vector(rng, n_src));
  Vec unpacked_ref = base;
  cpu::ulysses_unpack_heads(unpacked_ref.data(), packed_ref.data(), heads.data(), offsets.data(), P, B, T_, Htot, d,
                            true, 0, B, 0, T_);
  // sequence transforms on [B, P*T, h, d] with h = 3
  const int h = 3;
  const size_t n_seq = size_t(B) * P * T_ * h * d;
  const Vec seq = rounded_bf16(random_vector(rng, n_seq));
  Vec seq_packed_ref(n_seq), seq_unpacked_ref(n_seq);
  cpu::ulysses_pack_sequence(seq_packed_ref.data(), seq.data(), P, B, T_, h, d);
  cpu::ulysses_unpack_sequence(seq_unpacked_ref.data(), seq_packed_ref.data(), P, B, T_, h, d);

  DeviceBuffer<T> d_src(src), d_packed(n_packed), d_unpacked(base), d_seq(seq), d_seq_packed(n_seq), d_seq_back(n_seq);
  DeviceBuffer<int32_t> d_heads(heads);
  DeviceBuffer<int64_t> d_offsets(offsets);
  d_packed.poison(), d_seq_packed.poison(), d_seq_back.poison();
  cuda::ulysses_pack_heads(d_packed.get(), d_src.get(), dt, d_heads.get(), d_offsets.get(), P, B, T_, Htot, d, 0, B,
                           0, T_, nullptr);
  cuda::ulysses_unpack_heads(d_unpacked.get(), d_packed.get(), dt, d_heads.get(), d_offsets.get(), P, B, T_, Htot, d,
                             true, 0, B, 0, T_, nullptr);
  cuda::ulysses_pack_sequence(d_seq_packed.get(), d_seq.get(), dt, P, B, T_, h, d, nullptr);
  cuda::ulysses_unpack_sequence(d_seq_back.get(), d_seq_packed.get(), dt, P, B, T_, h, d, nullptr);
  Results res{{"pack_heads", normalised_error(d_packed.download(), packed_ref), 0.0},
              {"unpack_heads accumulate", normalised_error(d_unpacked.download(), unpacked_ref), tol_sum},
              {"pack_sequence", normalised_error(d_seq_packed.download(), seq_packed_ref), 0.0},
              {"unpack_sequence", normalised_error(d_seq_back.download(), seq), 0.0}};
  if (!replicated) {  // assignment: every head listed once, unpack(pack(x)) == x
    DeviceBuffer<T> d_back(base);
    cuda::ulysses_unpack_heads(d_back.get(), d_packed.get(), dt, d_heads.get(), d_offsets.get(), P, B, T_, Htot, d,
                               false, 0, B, 0, T_, nullptr);
    res.push_back({"unpack_heads assign", normalised_error(d_back.download(), src), 0.0});
  }
  return res;
}

std::vector<Case> all_cases(cuda::MatmulContext& ctx) {
  std::vector<Case> c;
  auto add = [&](std::string name, std::function<Results()> f) { c.push_back({std::move(name), std::move(f)}); };
  add("embedding rows=300 C=96 V=17 wpe", [] { return embedding_case(300, 96, 17, 64, true, 1); });
  add("embedding rows=37 C=100 V=50257 no-wpe", [] { return embedding_case(37, 100, 50257, 8, false, 2); });
  add("layernorm rows=5 C=768", [] { return layernorm_case(5, 768, false, 3); });
  add("layernorm rows=33 C=100", [] { return layernorm_case(33, 100, false, 4); });
  add("fused_residual_layernorm rows=17 C=256", [] { return layernorm_case(17, 256, true, 5); });
  add("fused_residual_layernorm rows=3 C=36", [] { return layernorm_case(3, 36, true, 6); });
  add("layernorm_backward rows=130 C=768", [] { return layernorm_backward_case(130, 768, 7); });
  add("layernorm_backward rows=9 C=100", [] { return layernorm_backward_case(9, 100, 8); });
  add("matmul M=37 IC=64 OC=40 bias", [&] { return matmul_case(ctx, 37, 64, 40, true, false, 9); });
  add("matmul M=128 IC=768 OC=256", [&] { return matmul_case(ctx, 128, 768, 256, false, false, 10); });
  add("matmul M=33 IC=128 OC=512 bias+gelu", [&] { return matmul_case(ctx, 33, 128, 512, true, true, 11); });
  add("matmul M=16 IC=64 OC=64 gelu", [&] { return matmul_case(ctx, 16, 64, 64, false, true, 12); });
  add("matmul_backward M=37 IC=64 OC=40", [&] { return matmul_backward_case(ctx, 37, 64, 40, 13); });
  add("matmul_backward M=256 IC=768 OC=2304", [&] { return matmul_backward_case(ctx, 256, 768, 2304, 14); });
  add("gelu/residual n=1000", [] { return elementwise_case(1000, 15); });
  add("gelu/residual n=13", [] { return elementwise_case(13, 16); });
  add("cast n=1003", [] { return cast_case(1003, 17); });
  add("rope rows=9 Hq=3 d=64", [] { return rope_case(9, 3, 64, 18); });
  add("rope rows=5 Hq=2 d=128", [] { return rope_case(5, 2, 128, 19); });
  add("attention B=2 N=100 Hq=4 Hkv=2 d=64", [] { return attention_case(2, 100, 4, 2, 64, 20); });
  add("attention B=1 N=130 Hq=2 Hkv=1 d=128", [] { return attention_case(1, 130, 2, 1, 128, 21); });
  add("attention B=1 N=64 Hq=1 Hkv=1 d=64", [] { return attention_case(1, 64, 1, 1, 64, 22); });
  add("attention B=1 N=1 Hq=2 Hkv=2 d=128", [] { return attention_case(1, 1, 2, 2, 128, 23); });
  add("attention B=1 N=300 Hq=8 Hkv=1 d=128", [] { return attention_case(1, 300, 8, 1, 128, 24); });
  add("crossentropy rows=7 V=1000 Vp=1008", [] { return crossentropy_case(7, 1000, 1008, 1.0f / 7, 25); });
  add("crossentropy rows=4 V=99 Vp=99 losses only", [] { return crossentropy_case(4, 99, 99, 0.0f, 26); });
  add("crossentropy rows=3 V=50257 Vp=50304", [] { return crossentropy_case(3, 50257, 50304, 1.0f / 3, 27); });
  add("adamw n=1003 fp32 grad", [] { return adamw_case<float>(1003, 28); });
  add("adamw n=4099 bf16 grad", [] { return adamw_case<bf16>(4099, 29); });
  add("sum_squares n=1000003", [] { return sum_squares_case(1000003, 30); });
  add("sum_squares n=5", [] { return sum_squares_case(5, 31); });
  add("layout bf16 P=4 B=2 T=5 Hq=8 Hkv=4 d=64", [] { return layout_case<bf16>(4, 2, 5, 8, 4, 64, 32); });
  add("layout bf16 P=4 B=1 T=3 Hq=4 Hkv=2 d=3", [] { return layout_case<bf16>(4, 1, 3, 4, 2, 3, 33); });
  add("layout f32 P=2 B=2 T=4 Hq=4 Hkv=2 d=5", [] { return layout_case<float>(2, 2, 4, 4, 2, 5, 34); });
  return c;
}

}  // namespace

TEST_CASE("every CUDA op matches the CPU reference", "[cuda]") {
  skip_without_cuda();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  cuda::MatmulContext ctx;
  int failures = 0;
  for (const Case& c : all_cases(ctx)) {
    Results results;
    std::string error;
    try {
      results = c.run();
      device_sync();
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) {
      std::printf("FAIL  %-44s threw: %s\n", c.name.c_str(), error.c_str());
      ++failures;
      CHECK(error.empty());
      continue;
    }
    failures += check_results(c.name, results);
  }
  std::printf("%d failure(s)\n", failures);
}

TEST_CASE("CUDA errors name the call", "[cuda]") {
  skip_without_cuda();
  cuda::set_cuda_check_rank(5);
  bool threw = false;
  try {
    CUDA_CHECK(cudaMemcpy(nullptr, reinterpret_cast<void*>(16), 64, cudaMemcpyDeviceToHost));
  } catch (const std::runtime_error& e) {
    threw = true;
    const std::string what = e.what();
    CHECK(what.find("rank 5") != std::string::npos);
    CHECK(what.find("cudaMemcpy") != std::string::npos);
    CHECK(what.find("test_cuda_ops.cpp") != std::string::npos);
  }
  CHECK(threw);
  cuda::set_cuda_check_rank(-1);
  cudaGetLastError();  // clear the sticky-free error state of the failed copy
}
