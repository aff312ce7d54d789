// The CUDA dispatch of kernels/ops.h: every ops:: function called on cuda tensors (a cuda
// ops::Context, the number formats of ops.h: bf16 activations and weights, fp32 parameter
// gradients / statistics / optimizer state, i32 ids) against the same ops:: function on fp32
// cpu tensors. Where test_cuda_ops checks the kernels, this checks the glue: dtypes, shapes,
// strides and offsets handed to the kernels, scratch from the context, the stream, the syncing
// reductions, copies and casts, and the errors for bad tensors.
// Inputs are random, never zero, and rounded to bf16 before both sides see them; outputs are
// NaN-poisoned before the cuda run (accumulated outputs start from the same random values);
// error = max |cuda - cpu| / max |cpu| (NaN or inf never passes). Without a CUDA device the
// executable prints "SKIPPED: no CUDA device" and exits with 77.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "tests/cuda/cuda_test_case.h"
#include "tests/cuda/cuda_test_util.h"

namespace {

using namespace ulysses;
using namespace ulysses::cuda::test;
using Vec = std::vector<float>;
using Ids = std::vector<int32_t>;
using Shape = std::initializer_list<int64_t>;


// Views: a host fp32 / i32 vector, a device buffer (its dtype from the element type).
Tensor host(const Vec& v, Shape s) { return Tensor(const_cast<float*>(v.data()), s, DType::f32, Device::cpu); }
Tensor host(const Ids& v, Shape s) { return Tensor(const_cast<int32_t*>(v.data()), s, DType::i32, Device::cpu); }
Tensor dev(const DeviceBuffer<float>& b, Shape s) { return Tensor(b.get(), s, DType::f32, Device::cuda); }
Tensor dev(const DeviceBuffer<bf16>& b, Shape s) { return Tensor(b.get(), s, DType::bf16, Device::cuda); }
Tensor dev(const DeviceBuffer<int32_t>& b, Shape s) { return Tensor(b.get(), s, DType::i32, Device::cuda); }

// Inputs uploaded and outputs poisoned with the synchronous API (legacy stream): wait for them
// before enqueueing on the context's stream, whatever its flags.
void ready() { CUDA_CHECK(cudaDeviceSynchronize()); }

Result err(const char* name, const std::vector<float>& got, const Vec& ref, double tol) {
  return {name, normalised_error(got, ref), tol};
}

// |got - ref| relative to sum |x| (the scale of a sum's rounding error); NaN fails.
Result sum_err(const char* name, double got, double ref, double abs_scale, double tol) {
  const double e = std::isfinite(got) ? std::fabs(got - ref) / abs_scale : 1e300;
  return {name, e, tol};
}

// An op that must throw a std::runtime_error whose message contains every one of `words`.
Result throws(const char* name, const std::function<void()>& f, std::vector<std::string> words) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    for (const std::string& w : words)
      if (what.find(w) == std::string::npos) {
        std::printf("      message without '%s': %s\n", w.c_str(), e.what());
        return {name, 1.0, 0.0};
      }
    return {name, 0.0, 0.0};
  } catch (const std::exception& e) {
    std::printf("      wrong exception type: %s\n", e.what());
    return {name, 1.0, 0.0};
  }
  std::printf("      did not throw\n");
  return {name, 1.0, 0.0};
}

// ---- copy, cast, sum, fill_zero -----------------------------------------------------------------
Results data_movement_case(ops::Context& ctx, int64_t n, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec x = random_vector(rng, n, 100.0f);
  double abs_sum = 0;
  for (float v : x) abs_sum += std::fabs(v);
  DeviceBuffer<float> d1(n), d2(n), d3(n);
  DeviceBuffer<bf16> h(n), h2(n);
  Vec back(n, NAN), back2(n, NAN);
  d1.poison(), d2.poison(), d3.poison(), h.poison(), h2.poison();
  ready();
  ops::copy(ctx, dev(d1, {n}), host(x, {n}));         // host -> device
  ops::copy(ctx, dev(d2, {n}), dev(d1, {n}));         // device -> device
  ops::cast(ctx, dev(h, {n}), dev(d2, {n}));          // f32 -> bf16
  ops::cast(ctx, dev(h2, {n}), dev(h, {n}));          // bf16 -> bf16 (a copy)
  ops::cast(ctx, dev(d3, {n}), dev(h2, {n}));         // bf16 -> f32
  ops::copy(ctx, host(back, {n}), dev(d3, {n}));      // device -> host
  ops::copy(ctx, host(back2, {n}), dev(d1, {n}));
  const double s = ops::sum(ctx, dev(d1, {n}));       // syncs: the copies above are done too
  const double s_ref = ops::sum(cpu, host(x, {n}));
  ops::synchronize(ctx);
  Results res{err("copy round trip", back2, x, 0.0),
              err("cast f32->bf16->bf16->f32", back, rounded_bf16(x), 0.0),
              err("cast to bf16", h.download(), rounded_bf16(x), 0.0),
              sum_err("sum", s, s_ref, abs_sum, 1e-12)};
  // host -> host on a cuda context, and fill_zero of an f32 and a bf16 buffer
  Vec hh(n, NAN);
  ops::copy(ctx, host(hh, {n}), host(x, {n}));
  res.push_back(err("copy host->host", hh, x, 0.0));
  ops::fill_zero(ctx, dev(d1, {n}));
  ops::fill_zero(ctx, dev(h, {n}));
  res.push_back(err("fill_zero f32", d1.download(), Vec(n, 0.0f), 0.0));
  res.push_back(err("fill_zero bf16", h.download(), Vec(n, 0.0f), 0.0));
  return res;
}

// ---- embedding ----------------------------------------------------------------------------------
Results embedding_case(ops::Context& ctx, int R, int C, int V, int maxpos, bool with_wpe, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  Ids tokens(R), positions(R);
  for (int r = 0; r < R; ++r) tokens[r] = rng.below(V), positions[r] = rng.below(maxpos);
  tokens[R - 1] = tokens[0];  // a repeated token: its rows are summed
  const Vec wte = rounded_bf16(random_vector(rng, size_t(V) * C));
  const Vec wpe = rounded_bf16(random_vector(rng, size_t(maxpos) * C));
  const Vec dout = rounded_bf16(random_vector(rng, size_t(R) * C));
  const Vec dwte0 = random_vector(rng, size_t(V) * C), dwpe0 = random_vector(rng, size_t(maxpos) * C);
  Vec out_ref(size_t(R) * C), dwte_ref = dwte0, dwpe_ref = dwpe0;
  const Tensor no;
  ops::embedding_forward(cpu, host(out_ref, {R, C}), host(tokens, {R}), host(positions, {R}), host(wte, {V, C}),
                         with_wpe ? host(wpe, {maxpos, C}) : no);
  ops::embedding_backward(cpu, host(dwte_ref, {V, C}), with_wpe ? host(dwpe_ref, {maxpos, C}) : no,
                          host(dout, {R, C}), host(tokens, {R}), host(positions, {R}));

  DeviceBuffer<int32_t> d_tok(tokens), d_pos(positions);
  DeviceBuffer<bf16> d_wte(wte), d_wpe(wpe), d_dout(dout), d_out(size_t(R) * C);
  DeviceBuffer<float> d_dwte(dwte0), d_dwpe(dwpe0);
  d_out.poison();
  ready();
  ops::embedding_forward(ctx, dev(d_out, {R, C}), dev(d_tok, {R}), dev(d_pos, {R}), dev(d_wte, {V, C}),
                         with_wpe ? dev(d_wpe, {maxpos, C}) : no);
  ops::embedding_backward(ctx, dev(d_dwte, {V, C}), with_wpe ? dev(d_dwpe, {maxpos, C}) : no, dev(d_dout, {R, C}),
                          dev(d_tok, {R}), dev(d_pos, {R}));
  Results res{err("out", d_out.download(), out_ref, 1e-2), err("dwte", d_dwte.download(), dwte_ref, 1e-5)};
  res.push_back(with_wpe ? err("dwpe", d_dwpe.download(), dwpe_ref, 1e-5)
                         : err("dwpe untouched", d_dwpe.download(), dwpe0, 0.0));
  return res;
}

// ---- layernorm ----------------------------------------------------------------------------------
Results layernorm_case(ops::Context& ctx, int R, int C, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const size_t n = size_t(R) * C;
  const Vec inp = rounded_bf16(random_vector(rng, n, 2.0f)), dout = rounded_bf16(random_vector(rng, n));
  const Vec w = rounded_bf16(random_vector(rng, C)), b = rounded_bf16(random_vector(rng, C));
  const Vec dinp0 = rounded_bf16(random_vector(rng, n)), dw0 = random_vector(rng, C), db0 = random_vector(rng, C);
  Vec out_ref(n), mean_ref(R), rstd_ref(R), dinp_ref = dinp0, dw_ref = dw0, db_ref = db0;
  ops::layernorm_forward(cpu, host(out_ref, {R, C}), host(mean_ref, {R}), host(rstd_ref, {R}), host(inp, {R, C}),
                         host(w, {C}), host(b, {C}));
  ops::layernorm_backward(cpu, host(dinp_ref, {R, C}), host(dw_ref, {C}), host(db_ref, {C}), host(dout, {R, C}),
                          host(inp, {R, C}), host(w, {C}), host(mean_ref, {R}), host(rstd_ref, {R}));

  DeviceBuffer<bf16> d_inp(inp), d_dout(dout), d_w(w), d_b(b), d_out(n), d_dinp(dinp0);
  DeviceBuffer<float> d_mean(R), d_rstd(R), d_mean_ref(mean_ref), d_rstd_ref(rstd_ref), d_dw(dw0), d_db(db0);
  d_out.poison(), d_mean.poison(), d_rstd.poison();
  ready();
  ops::layernorm_forward(ctx, dev(d_out, {R, C}), dev(d_mean, {R}), dev(d_rstd, {R}), dev(d_inp, {R, C}),
                         dev(d_w, {C}), dev(d_b, {C}));
  // both backwards consume the reference statistics
  ops::layernorm_backward(ctx, dev(d_dinp, {R, C}), dev(d_dw, {C}), dev(d_db, {C}), dev(d_dout, {R, C}),
                          dev(d_inp, {R, C}), dev(d_w, {C}), dev(d_mean_ref, {R}), dev(d_rstd_ref, {R}));
  return {err("out", d_out.download(), out_ref, 1e-2),     err("mean", d_mean.download(), mean_ref, 1e-5),
          err("rstd", d_rstd.download(), rstd_ref, 1e-5),  err("dinp", d_dinp.download(), dinp_ref, 1e-2),
          err("dweight", d_dw.download(), dw_ref, 1e-4),   err("dbias", d_db.download(), db_ref, 1e-4)};
}

// ---- matmul -------------------------------------------------------------------------------------
// all_grads = false: dinp and dbias empty, only dweight accumulated.
Results matmul_case(ops::Context& ctx, int M, int IC, int OC, bool with_bias, bool all_grads, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec inp = rounded_bf16(random_vector(rng, size_t(M) * IC));
  const Vec w = rounded_bf16(random_vector(rng, size_t(OC) * IC, 0.1f));
  const Vec bias = rounded_bf16(random_vector(rng, OC));
  const Vec dout = rounded_bf16(random_vector(rng, size_t(M) * OC));
  const Vec dinp0 = rounded_bf16(random_vector(rng, size_t(M) * IC));
  const Vec dw0 = random_vector(rng, size_t(OC) * IC), db0 = random_vector(rng, OC);
  const Tensor no;
  Vec out_ref(size_t(M) * OC), dinp_ref = dinp0, dw_ref = dw0, db_ref = db0;
  ops::matmul_forward(cpu, host(out_ref, {M, OC}), host(inp, {M, IC}), host(w, {OC, IC}),
                      with_bias ? host(bias, {OC}) : no);
  ops::matmul_backward(cpu, all_grads ? host(dinp_ref, {M, IC}) : no, host(dw_ref, {OC, IC}),
                       all_grads ? host(db_ref, {OC}) : no, host(dout, {M, OC}), host(inp, {M, IC}), host(w, {OC, IC}));

  DeviceBuffer<bf16> d_inp(inp), d_w(w), d_bias(bias), d_dout(dout), d_out(size_t(M) * OC), d_dinp(dinp0);
  DeviceBuffer<float> d_dw(dw0), d_db(db0);
  d_out.poison();
  ready();
  ops::matmul_forward(ctx, dev(d_out, {M, OC}), dev(d_inp, {M, IC}), dev(d_w, {OC, IC}),
                      with_bias ? dev(d_bias, {OC}) : no);
  ops::matmul_backward(ctx, all_grads ? dev(d_dinp, {M, IC}) : no, dev(d_dw, {OC, IC}),
                       all_grads ? dev(d_db, {OC}) : no, dev(d_dout, {M, OC}), dev(d_inp, {M, IC}), dev(d_w, {OC, IC}));
  return {err("out", d_out.download(), out_ref, 1e-2), err("dinp", d_dinp.download(), dinp_ref, 1e-2),
          err("dweight", d_dw.download(), dw_ref, 1e-4), err("dbias", d_db.download(), db_ref, 1e-5)};
}

// ---- gelu, residual -----------------------------------------------------------------------------
Results elementwise_case(ops::Context& ctx, int64_t n, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec x = rounded_bf16(random_vector(rng, n, 3.0f)), y = rounded_bf16(random_vector(rng, n));
  const Vec d0 = rounded_bf16(random_vector(rng, n));
  Vec gelu_ref(n), dgelu_ref = d0, res_ref(n);
  ops::gelu_forward(cpu, host(gelu_ref, {n}), host(x, {n}));
  ops::gelu_backward(cpu, host(dgelu_ref, {n}), host(x, {n}), host(y, {n}));
  ops::residual_forward(cpu, host(res_ref, {n}), host(x, {n}), host(y, {n}));

  DeviceBuffer<bf16> d_x(x), d_y(y), d_gelu(n), d_dgelu(d0), d_res(n), d_alias(x);
  d_gelu.poison(), d_res.poison();
  ready();
  ops::gelu_forward(ctx, dev(d_gelu, {n}), dev(d_x, {n}));
  ops::gelu_backward(ctx, dev(d_dgelu, {n}), dev(d_x, {n}), dev(d_y, {n}));
  ops::residual_forward(ctx, dev(d_res, {n}), dev(d_x, {n}), dev(d_y, {n}));
  ops::residual_forward(ctx, dev(d_alias, {n}), dev(d_alias, {n}), dev(d_y, {n}));  // in place, as the model does
  return {err("gelu", d_gelu.download(), gelu_ref, 1e-2),
          err("gelu_backward", d_dgelu.download(), dgelu_ref, 1e-2),
          err("residual", d_res.download(), res_ref, 1e-2),
          err("residual in place", d_alias.download(), res_ref, 1e-2)};
}

// ---- fused forward ops: matmul + GELU epilogue, residual + LayerNorm -----------------------------
// matmul_gelu_forward against the cpu composition (matmul_forward, gelu_forward); on cuda the GELU
// comes from cuBLASLt's epilogue, so out_gelu is also checked against gelu_forward of the cuda
// pre_gelu (one bf16 rounding apart).
Results matmul_gelu_case(ops::Context& ctx, int M, int IC, int OC, bool with_bias, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec inp = rounded_bf16(random_vector(rng, size_t(M) * IC));
  const Vec w = rounded_bf16(random_vector(rng, size_t(OC) * IC, 0.2f));
  const Vec bias = rounded_bf16(random_vector(rng, OC));
  const Tensor no;
  const size_t n = size_t(M) * OC;
  Vec out_ref(n), pre_ref(n);
  ops::matmul_gelu_forward(cpu, host(out_ref, {M, OC}), host(pre_ref, {M, OC}), host(inp, {M, IC}),
                           host(w, {OC, IC}), with_bias ? host(bias, {OC}) : no);

  DeviceBuffer<bf16> d_inp(inp), d_w(w), d_bias(bias), d_out(n), d_pre(n), d_regelu(n);
  d_out.poison(), d_pre.poison(), d_regelu.poison();
  ready();
  ops::matmul_gelu_forward(ctx, dev(d_out, {M, OC}), dev(d_pre, {M, OC}), dev(d_inp, {M, IC}), dev(d_w, {OC, IC}),
                           with_bias ? dev(d_bias, {OC}) : no);
  ops::gelu_forward(ctx, dev(d_regelu, {M, OC}), dev(d_pre, {M, OC}));
  const std::vector<float> out = d_out.download();
  return {err("out_gelu", out, out_ref, 1e-2), err("pre_gelu", d_pre.download(), pre_ref, 1e-2),
          err("out_gelu vs gelu_forward(pre)", out, d_regelu.download(), 1e-2)};
}

// residual_layernorm_forward: residual_out = a + b (one bf16 rounding: exactly the rounded cpu
// sum), then the LayerNorm of it against the cpu layernorm_forward of that rounded sum. Run into a
// separate residual_out and in place (residual_out = a, as the model does), and checked bitwise
// against layernorm_forward of its own residual_out: recompute relies on that (ops.h).
Results residual_layernorm_case(ops::Context& ctx, int R, int C, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const size_t n = size_t(R) * C;
  const Vec a = rounded_bf16(random_vector(rng, n, 2.0f)), b = rounded_bf16(random_vector(rng, n));
  const Vec w = rounded_bf16(random_vector(rng, C)), bias = rounded_bf16(random_vector(rng, C));
  Vec res_ref(n), ln_unused(n), mean_unused(R), rstd_unused(R);
  ops::residual_layernorm_forward(cpu, host(res_ref, {R, C}), host(ln_unused, {R, C}), host(mean_unused, {R}),
                                  host(rstd_unused, {R}), host(a, {R, C}), host(b, {R, C}), host(w, {C}),
                                  host(bias, {C}));
  const Vec res_bf = rounded_bf16(res_ref);
  Vec ln_ref(n), mean_ref(R), rstd_ref(R);
  ops::layernorm_forward(cpu, host(ln_ref, {R, C}), host(mean_ref, {R}), host(rstd_ref, {R}), host(res_bf, {R, C}),
                         host(w, {C}), host(bias, {C}));

  DeviceBuffer<bf16> d_a(a), d_b(b), d_w(w), d_bias(bias), d_res(n), d_ln(n), d_inplace(a), d_ln2(n), d_reln(n);
  DeviceBuffer<float> d_mean(R), d_rstd(R), d_mean2(R), d_rstd2(R), d_remean(R), d_rerstd(R);
  d_res.poison(), d_ln.poison(), d_ln2.poison(), d_reln.poison();
  d_mean.poison(), d_rstd.poison(), d_mean2.poison(), d_rstd2.poison(), d_remean.poison(), d_rerstd.poison();
  ready();
  ops::residual_layernorm_forward(ctx, dev(d_res, {R, C}), dev(d_ln, {R, C}), dev(d_mean, {R}), dev(d_rstd, {R}),
                                  dev(d_a, {R, C}), dev(d_b, {R, C}), dev(d_w, {C}), dev(d_bias, {C}));
  ops::residual_layernorm_forward(ctx, dev(d_inplace, {R, C}), dev(d_ln2, {R, C}), dev(d_mean2, {R}),
                                  dev(d_rstd2, {R}), dev(d_inplace, {R, C}), dev(d_b, {R, C}), dev(d_w, {C}),
                                  dev(d_bias, {C}));
  ops::layernorm_forward(ctx, dev(d_reln, {R, C}), dev(d_remean, {R}), dev(d_rerstd, {R}), dev(d_res, {R, C}),
                         dev(d_w, {C}), dev(d_bias, {C}));
  const std::vector<float> ln = d_ln.download(), mean = d_mean.download(), rstd = d_rstd.download();
  return {err("residual_out", d_res.download(), res_bf, 0.0),
          err("ln_out", ln, ln_ref, 1e-2),
          err("mean", mean, mean_ref, 1e-5),
          err("rstd", rstd, rstd_ref, 1e-5),
          err("in place: residual_out", d_inplace.download(), res_bf, 0.0),
          err("in place: ln_out bitwise", d_ln2.download(), ln, 0.0),
          err("layernorm_forward(residual_out) bitwise", d_reln.download(), ln, 0.0),
          err("its mean bitwise", d_remean.download(), mean, 0.0),
          err("its rstd bitwise", d_rerstd.download(), rstd, 0.0)};
}

// ---- rope: heads [head_begin, head_begin + n_heads) of a packed [R, Htot, d] buffer -----------
Results rope_case(ops::Context& ctx, int R, int Htot, int d, int head_begin, int n_heads, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const size_t n = size_t(R) * Htot * d;
  const Vec x = rounded_bf16(random_vector(rng, n));
  Ids pos(R);
  for (int r = 0; r < R; ++r) pos[r] = r * 9973 % 200000;
  Vec fwd_ref = x, bwd_ref = x;
  ops::rope_forward(cpu, host(fwd_ref, {R, Htot, d}), head_begin, n_heads, host(pos, {R}), 10000.0f);
  ops::rope_backward(cpu, host(bwd_ref, {R, Htot, d}), head_begin, n_heads, host(pos, {R}), 10000.0f);
  DeviceBuffer<bf16> d_f(x), d_b(x);
  DeviceBuffer<int32_t> d_pos(pos);
  ready();
  ops::rope_forward(ctx, dev(d_f, {R, Htot, d}), head_begin, n_heads, dev(d_pos, {R}), 10000.0f);
  ops::rope_backward(ctx, dev(d_b, {R, Htot, d}), head_begin, n_heads, dev(d_pos, {R}), 10000.0f);
  // the heads outside the range must come back bit for bit (compared within the whole buffer)
  return {err("forward", d_f.download(), fwd_ref, 1e-2), err("backward", d_b.download(), bwd_ref, 1e-2)};
}

// ---- attention ----------------------------------------------------------------------------------
Results attention_case(ops::Context& ctx, int B, int N, int Hq, int Hkv, int d, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const int Htot = Hq + 2 * Hkv;
  const size_t n_qkv = size_t(B) * N * Htot * d, n_out = size_t(B) * N * Hq * d, n_lse = size_t(B) * Hq * N;
  const Vec qkv = rounded_bf16(random_vector(rng, n_qkv, 2.0f));
  const Vec dout = rounded_bf16(random_vector(rng, n_out));
  Vec out_ref(n_out), lse_ref(n_lse), dqkv_ref(n_qkv);
  ops::attention_forward(cpu, host(out_ref, {B, N, Hq, d}), host(lse_ref, {B, Hq, N}), host(qkv, {B, N, Htot, d}), Hq,
                         Hkv);
  // both backwards consume the same (bf16-rounded) out and the reference lse
  const Vec out_bf = rounded_bf16(out_ref);
  ops::attention_backward(cpu, host(dqkv_ref, {B, N, Htot, d}), host(dout, {B, N, Hq, d}), host(qkv, {B, N, Htot, d}),
                          host(out_bf, {B, N, Hq, d}), host(lse_ref, {B, Hq, N}), Hq, Hkv);

  DeviceBuffer<bf16> d_qkv(qkv), d_out(n_out), d_dout(dout), d_out_bf(out_bf), d_dqkv(n_qkv);
  DeviceBuffer<float> d_lse(n_lse), d_lse_ref(lse_ref);
  d_out.poison(), d_lse.poison(), d_dqkv.poison();
  ready();
  ops::attention_forward(ctx, dev(d_out, {B, N, Hq, d}), dev(d_lse, {B, Hq, N}), dev(d_qkv, {B, N, Htot, d}), Hq, Hkv);
  ops::attention_backward(ctx, dev(d_dqkv, {B, N, Htot, d}), dev(d_dout, {B, N, Hq, d}), dev(d_qkv, {B, N, Htot, d}),
                          dev(d_out_bf, {B, N, Hq, d}), dev(d_lse_ref, {B, Hq, N}), Hq, Hkv);
  return {err("out", d_out.download(), out_ref, 1e-2), err("lse", d_lse.download(), lse_ref, 1e-4),
          err("dqkv", d_dqkv.download(), dqkv_ref, 2e-2)};
}

// ---- cross-entropy ------------------------------------------------------------------------------
Results crossentropy_case(ops::Context& ctx, int R, int V, int Vp, float grad_scale, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec logits = rounded_bf16(random_vector(rng, size_t(R) * Vp, 4.0f));
  Ids targets(R);
  for (int r = 0; r < R; ++r) targets[r] = r % 5 == 3 ? -1 : rng.below(V);
  Vec grad_ref = logits, loss_ref(R);
  ops::crossentropy_forward_backward(cpu, host(loss_ref, {R}), host(grad_ref, {R, Vp}), host(targets, {R}), V,
                                     grad_scale);
  DeviceBuffer<bf16> d_logits(logits);
  DeviceBuffer<float> d_loss(R);
  DeviceBuffer<int32_t> d_t(targets);
  d_loss.poison();
  ready();
  ops::crossentropy_forward_backward(ctx, dev(d_loss, {R}), dev(d_logits, {R, Vp}), dev(d_t, {R}), V, grad_scale);
  return {err("losses", d_loss.download(), loss_ref, 1e-4),
          err(grad_scale != 0 ? "gradient" : "logits untouched", d_logits.download(), grad_ref, 1e-2)};
}

// ---- optimizer, sum of squares ------------------------------------------------------------------
Results adamw_case(ops::Context& ctx, int64_t n, bool with_lowp, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec p0 = random_vector(rng, n), m0 = random_vector(rng, n, 0.01f), g = random_vector(rng, n);
  Vec v0 = random_vector(rng, n, 0.01f);
  for (auto& x : v0) x = std::fabs(x);
  Vec p_ref = p0, m_ref = m0, v_ref = v0;
  const int t = 3;
  ops::adamw_update(cpu, host(p_ref, {n}), host(g, {n}), host(m_ref, {n}), host(v_ref, {n}), 1e-3f, 0.9f, 0.95f, 1e-8f,
                    0.1f, 0.5f, t);
  DeviceBuffer<float> d_p(p0), d_g(g), d_m(m0), d_v(v0);
  DeviceBuffer<bf16> d_lowp(n);
  d_lowp.poison();
  ready();
  ops::adamw_update(ctx, dev(d_p, {n}), dev(d_g, {n}), dev(d_m, {n}), dev(d_v, {n}), 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
                    0.5f, t, with_lowp ? dev(d_lowp, {n}) : Tensor());
  Results res{err("master", d_p.download(), p_ref, 1e-6), err("m", d_m.download(), m_ref, 1e-6),
              err("v", d_v.download(), v_ref, 1e-6)};
  if (with_lowp) res.push_back(err("param_lowp", d_lowp.download(), rounded_bf16(p_ref), 1e-2));
  else res.push_back({"param_lowp untouched (NaN)", std::isnan(d_lowp.download()[0]) ? 0.0 : 1.0, 0.0});
  return res;
}

Results sum_squares_case(ops::Context& ctx, int64_t n, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const Vec x = rounded_bf16(random_vector(rng, n));
  const double ref = ops::sum_squares(cpu, host(x, {n}));
  DeviceBuffer<float> d_x(x);
  DeviceBuffer<bf16> d_xb(x);
  ready();
  const double got = ops::sum_squares(ctx, dev(d_x, {n}));
  const double got_bf16 = ops::sum_squares(ctx, dev(d_xb, {n}));
  return {sum_err("f32", got, ref, ref, 1e-12), sum_err("bf16", got_bf16, ref, ref, 1e-12)};
}

// ---- Ulysses layout transforms, heads / head_offsets as DEVICE arrays --------------------------
// Peer p takes q heads [p*Hq/P, ..) and the kv heads of its group (replicated when Hkv < P, so
// unpack_heads with accumulate sums copies).
template <typename T>
Results layout_case(ops::Context& ctx, int P, int B, int T_, int Hq, int Hkv, int d, uint64_t seed) {
  Rng rng(seed);
  ops::Context cpu;
  const int Htot = Hq + 2 * Hkv;
  std::vector<int32_t> heads;
  std::vector<int64_t> offsets{0};
  for (int p = 0; p < P; ++p) {
    for (int h = p * Hq / P; h < (p + 1) * Hq / P; ++h) heads.push_back(h);
    const int g0 = p * Hkv / P, g1 = Hkv >= P ? (p + 1) * Hkv / P : g0 + 1;
    for (int g = g0; g < g1; ++g) heads.push_back(Hq + g);
    for (int g = g0; g < g1; ++g) heads.push_back(Hq + Hkv + g);
    offsets.push_back(int64_t(heads.size()));
  }
  const int64_t total = offsets.back();
  const double tol_sum = std::is_same_v<T, bf16> ? 1e-2 : 1e-6;
  const Vec src = rounded_bf16(random_vector(rng, size_t(B) * T_ * Htot * d));
  const Vec base = rounded_bf16(random_vector(rng, src.size()));
  Vec packed_ref(size_t(B) * T_ * total * d), unpacked_ref = base;
  ops::ulysses_pack_heads(cpu, host(packed_ref, {int64_t(packed_ref.size())}), host(src, {B, T_, Htot, d}),
                          heads.data(), offsets.data(), P);
  ops::ulysses_unpack_heads(cpu, host(unpacked_ref, {B, T_, Htot, d}), host(packed_ref, {int64_t(packed_ref.size())}),
                            heads.data(), offsets.data(), P, true);
  const int h = 3;
  const Vec seq = rounded_bf16(random_vector(rng, size_t(B) * P * T_ * h * d));
  Vec seq_packed_ref(seq.size()), seq_back_ref(seq.size());
  ops::ulysses_pack_sequence(cpu, host(seq_packed_ref, {int64_t(seq.size())}), host(seq, {B, P * T_, h, d}), P);
  ops::ulysses_unpack_sequence(cpu, host(seq_back_ref, {B, P * T_, h, d}), host(seq_packed_ref, {int64_t(seq.size())}),
                               P);

  DeviceBuffer<T> d_src(src), d_packed(packed_ref.size()), d_unpacked(base), d_seq(seq), d_seq_packed(seq.size()),
      d_seq_back(seq.size());
  DeviceBuffer<int32_t> d_heads(heads);
  DeviceBuffer<int64_t> d_offsets(offsets);
  d_packed.poison(), d_seq_packed.poison(), d_seq_back.poison();
  ready();
  const int64_t n_packed = int64_t(packed_ref.size()), n_seq = int64_t(seq.size());
  ops::ulysses_pack_heads(ctx, dev(d_packed, {n_packed}), dev(d_src, {B, T_, Htot, d}), d_heads.get(), d_offsets.get(),
                          P);
  ops::ulysses_unpack_heads(ctx, dev(d_unpacked, {B, T_, Htot, d}), dev(d_packed, {n_packed}), d_heads.get(),
                            d_offsets.get(), P, true);
  ops::ulysses_pack_sequence(ctx, dev(d_seq_packed, {n_seq}), dev(d_seq, {B, P * T_, h, d}), P);
  ops::ulysses_unpack_sequence(ctx, dev(d_seq_back, {B, P * T_, h, d}), dev(d_seq_packed, {n_seq}), P);
  Results res{err("pack_heads", d_packed.download(), packed_ref, 0.0),
              err("unpack_heads accumulate", d_unpacked.download(), unpacked_ref, tol_sum),
              err("pack_sequence", d_seq_packed.download(), seq_packed_ref, 0.0),
              err("unpack_sequence", d_seq_back.download(), seq_back_ref, 0.0)};
  {
    // the row-range form (ops::TokenRows), called as the chunked all-to-alls call it: per batch
    // row, K = 3 ranges of ceil / floor(T / 3) rows, together every row once, give the whole
    // call's result (pack: every element of the poisoned output written)
    DeviceBuffer<T> d_packed_rows(packed_ref.size()), d_unpacked_rows(base);
    d_packed_rows.poison();
    ready();
    const int K = std::min(3, T_);
    for (int b = 0; b < B; ++b)
      for (int k = 0; k < K; ++k) {
        const ops::TokenRows rows{b, k * (T_ / K) + std::min(k, T_ % K), T_ / K + (k < T_ % K ? 1 : 0)};
        ops::ulysses_pack_heads(ctx, dev(d_packed_rows, {n_packed}), dev(d_src, {B, T_, Htot, d}), d_heads.get(),
                                d_offsets.get(), P, rows);
        ops::ulysses_unpack_heads(ctx, dev(d_unpacked_rows, {B, T_, Htot, d}), dev(d_packed, {n_packed}),
                                  d_heads.get(), d_offsets.get(), P, true, rows);
      }
    res.push_back(err("pack_heads rows", d_packed_rows.download(), packed_ref, 0.0));
    res.push_back(err("unpack_heads accumulate rows", d_unpacked_rows.download(), unpacked_ref, tol_sum));
  }
  if (Hkv >= P) {  // every head listed once: unpack (assign) of pack gives the source back
    DeviceBuffer<T> d_back(base);
    ready();
    ops::ulysses_unpack_heads(ctx, dev(d_back, {B, T_, Htot, d}), dev(d_packed, {n_packed}), d_heads.get(),
                              d_offsets.get(), P, false);
    res.push_back(err("unpack_heads assign", d_back.download(), src, 0.0));
  }
  return res;
}

// ---- bad tensors and unsupported shapes give errors that name the op ----------------------------
Results errors_case(ops::Context& ctx) {
  DeviceBuffer<float> f(4096);
  DeviceBuffer<bf16> b(4096);
  Vec h(64, 1.0f);
  Results res;
  res.push_back(throws("f32 where bf16 is expected",
                       [&] { ops::gelu_forward(ctx, dev(b, {64}), dev(f, {64})); }, {"gelu_forward", "inp", "bf16"}));
  res.push_back(throws("host tensor on a cuda context",
                       [&] { ops::residual_forward(ctx, dev(b, {64}), dev(b, {64}), host(h, {64})); },
                       {"residual_forward", "b", "on cpu"}));
  res.push_back(throws("bf16 parameter gradient",
                       [&] {
                         ops::layernorm_backward(ctx, dev(b, {2, 8}), dev(b, {8}), dev(b, {8}), dev(b, {2, 8}),
                                                 dev(b, {2, 8}), dev(b, {8}), dev(f, {2}), dev(f, {2}));
                       },
                       {"layernorm_backward", "dweight", "f32"}));
  res.push_back(throws("matmul IC not a multiple of 8",
                       [&] { ops::matmul_forward(ctx, dev(b, {4, 8}), dev(b, {4, 12}), dev(b, {8, 12}), Tensor()); },
                       {"matmul_forward", "multiples of 8", "IC=12"}));
  res.push_back(throws("attention head dimension 32",
                       [&] { ops::attention_forward(ctx, dev(b, {1, 8, 2, 32}), dev(f, {1, 2, 8}),
                                                    dev(b, {1, 8, 6, 32}), 2, 2); },
                       {"attention_forward", "head dimension 32"}));
  // (cuDNN SDPA is wired since runtime.attention = cudnn: that case now runs, see
  // test_cudnn_attention.) Grouped-query attention needs Hq a multiple of Hkv, on both paths.
  for (bool cudnn : {false, true}) {
    ctx.cudnn_attention = cudnn;
    res.push_back(throws(cudnn ? "attention Hq % Hkv != 0 (cuDNN)" : "attention Hq % Hkv != 0",
                         [&] { ops::attention_forward(ctx, dev(b, {1, 8, 3, 64}), dev(f, {1, 3, 8}),
                                                      dev(b, {1, 8, 7, 64}), 3, 2); },
                         {"attention_forward", "Hq=3 is not a multiple of Hkv=2"}));
  }
  ctx.cudnn_attention = true;
  // cuDNN SDPA refuses a head dimension that is not a multiple of 8 before any device work
  res.push_back(throws("cuDNN attention head dimension 36",
                       [&] { ops::attention_forward(ctx, dev(b, {1, 8, 2, 36}), dev(f, {1, 2, 8}),
                                                    dev(b, {1, 8, 6, 36}), 2, 2); },
                       {"runtime.attention: cudnn"}));
  ctx.cudnn_attention = false;
  res.push_back(throws("copy to the host on a cpu context",
                       [&] {
                         ops::Context cpu;
                         ops::copy(cpu, host(h, {64}), dev(f, {64}));
                       },
                       {"copy", "cuda context"}));
  return res;
}

struct Case {
  std::string name;
  std::function<Results()> run;
};

std::vector<Case> all_cases(ops::Context& ctx) {
  std::vector<Case> c;
  auto add = [&](std::string name, std::function<Results()> f) { c.push_back({std::move(name), std::move(f)}); };
  add("copy/cast/sum/fill_zero n=1003", [&] { return data_movement_case(ctx, 1003, 1); });
  add("copy/cast/sum/fill_zero n=1000003", [&] { return data_movement_case(ctx, 1000003, 2); });
  add("embedding R=37 C=96 V=17 wpe", [&] { return embedding_case(ctx, 37, 96, 17, 64, true, 3); });
  add("embedding R=21 C=100 V=50257 no-wpe", [&] { return embedding_case(ctx, 21, 100, 50257, 8, false, 4); });
  add("layernorm R=33 C=100", [&] { return layernorm_case(ctx, 33, 100, 5); });
  add("layernorm R=131 C=768", [&] { return layernorm_case(ctx, 131, 768, 6); });
  add("matmul M=37 IC=64 OC=40 bias", [&] { return matmul_case(ctx, 37, 64, 40, true, true, 7); });
  add("matmul M=65 IC=256 OC=768", [&] { return matmul_case(ctx, 65, 256, 768, false, true, 8); });
  add("matmul M=9 IC=128 OC=64 dweight only", [&] { return matmul_case(ctx, 9, 128, 64, true, false, 9); });
  add("gelu/residual n=1001", [&] { return elementwise_case(ctx, 1001, 10); });
  add("matmul_gelu M=37 IC=64 OC=256 bias", [&] { return matmul_gelu_case(ctx, 37, 64, 256, true, 24); });
  add("matmul_gelu M=65 IC=128 OC=512 no bias", [&] { return matmul_gelu_case(ctx, 65, 128, 512, false, 25); });
  add("residual_layernorm R=33 C=768", [&] { return residual_layernorm_case(ctx, 33, 768, 26); });
  add("residual_layernorm R=17 C=100 (scalar)", [&] { return residual_layernorm_case(ctx, 17, 100, 27); });
  add("rope R=9 Htot=5 d=64 heads [1, 4)", [&] { return rope_case(ctx, 9, 5, 64, 1, 3, 11); });
  add("rope R=7 Htot=4 d=128 heads [0, 3)", [&] { return rope_case(ctx, 7, 4, 128, 0, 3, 12); });
  add("attention B=2 N=100 Hq=4 Hkv=2 d=64", [&] { return attention_case(ctx, 2, 100, 4, 2, 64, 13); });
  add("attention B=1 N=130 Hq=8 Hkv=2 d=128", [&] { return attention_case(ctx, 1, 130, 8, 2, 128, 14); });
  add("attention B=1 N=67 Hq=3 Hkv=1 d=64", [&] { return attention_case(ctx, 1, 67, 3, 1, 64, 15); });
  add("crossentropy R=7 V=1000 Vp=1008", [&] { return crossentropy_case(ctx, 7, 1000, 1008, 1.0f / 7, 16); });
  add("crossentropy R=4 V=99 Vp=104 losses only", [&] { return crossentropy_case(ctx, 4, 99, 104, 0.0f, 17); });
  add("adamw n=4099 param_lowp", [&] { return adamw_case(ctx, 4099, true, 18); });
  add("adamw n=1003 no param_lowp", [&] { return adamw_case(ctx, 1003, false, 19); });
  add("sum_squares n=1000003", [&] { return sum_squares_case(ctx, 1000003, 20); });
  add("sum_squares n=5", [&] { return sum_squares_case(ctx, 5, 21); });
  add("layout bf16 P=4 B=2 T=5 Hq=8 Hkv=2 d=64", [&] { return layout_case<bf16>(ctx, 4, 2, 5, 8, 2, 64, 22); });
  add("layout f32 P=2 B=2 T=3 Hq=4 Hkv=2 d=5", [&] { return layout_case<float>(ctx, 2, 2, 3, 4, 2, 5, 23); });
  add("errors name the op", [&] { return errors_case(ctx); });
  return c;
}

}  // namespace

TEST_CASE("every op dispatches to CUDA and matches the CPU", "[cuda]") {
  skip_without_cuda();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  ops::Context ctx(Device::cuda);
  int failures = 0;
  for (const Case& c : all_cases(ctx)) {
    Results results;
    std::string error;
    try {
      results = c.run();
      ops::synchronize(ctx);
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
