// Every CPU op's backward against central finite differences of its forward, driven by one
// table (in the spirit of ggml's test-backend-ops): a row names the op and its shape, builds
// its inputs, and wraps the kernels as out = forward(inputs) and grads = backward(inputs, dout).
//
// The driver takes the scalar L = sum(out * R) for a fixed random R (accumulated in double):
//   - sampled elements: dL/dx_k ~ (L(x + h e_k) - L(x - h e_k)) / 2h, h = step * max(1, |x_k|);
//   - one random direction u over the whole input: <grad, u> ~ (L(x + h u) - L(x - h u)) / 2h.
// It also checks the gradient convention (accumulate: backward adds onto a random prior value;
// overwrite: the prior garbage is ignored) and plants sentinels around every output.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "kernel_test_util.h"
#include "kernels/cpu/cpu_ops.h"

namespace cpu = ulysses::cpu;
using ulysses::test::Guarded;
using ulysses::test::Rng;

namespace {

struct Input {
  std::string name;
  std::vector<float> value;
  bool needs_grad = true;
};

using Inputs = std::vector<const float*>;
using Grads = std::vector<float*>;  // null where the input needs no gradient

struct GradCase {
  std::string name;
  std::vector<Input> inputs;
  size_t out_size = 0;
  std::function<void(const Inputs& in, float* out)> forward;
  std::function<void(const Inputs& in, const float* dout, const Grads& grads)> backward;
  bool grads_accumulate = true;  // false: backward overwrites (attention, crossentropy)
  bool uniform_dout = false;     // dout must be one constant (crossentropy's grad_scale)
  double step = 1e-3;            // relative finite-difference step
  double tol = 1e-2;             // on the relative error of the gradient norm and the max error
  int samples = 48;              // sampled elements per input
};

double objective(const GradCase& op, const std::vector<std::vector<float>>& x,
                 const std::vector<float>& R) {
  Inputs in;
  for (const auto& v : x) in.push_back(v.data());
  Guarded out(op.out_size);
  // one thread: the many small forwards of the differences would mostly measure OpenMP
  // barriers on a loaded machine (the threaded paths run in the analytic pass)
  ulysses::test::with_threads(1, [&] { op.forward(in, out.data()); });
  REQUIRE(out.intact());
  double L = 0.0;
  for (size_t i = 0; i < op.out_size; i++) L += double(out[i]) * R[i];
  return L;
}

void check_gradients(const GradCase& op, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> R = op.uniform_dout ? std::vector<float>(op.out_size, 0.37f)
                                         : rng.normals(op.out_size);
  std::vector<std::vector<float>> x;
  for (const auto& input : op.inputs) x.push_back(input.value);

  // Analytic gradients, on top of a random prior (accumulate) or garbage (overwrite).
  Inputs in;
  for (const auto& v : x) in.push_back(v.data());
  std::vector<Guarded> grads;
  std::vector<std::vector<float>> prior;
  for (const auto& input : op.inputs) {
    prior.push_back(op.grads_accumulate ? rng.normals(input.value.size()) 
                                        : std::vector<float>(input.value.size(), 1e30f));
    grads.emplace_back(prior.back());
  }
  Grads g;
  for (size_t k = 0; k < op.inputs.size(); k++)
    g.push_back(op.inputs[k].needs_grad ? grads[k].data() : nullptr);
  Guarded dout(R);
  op.backward(in, dout.data(), g);
  REQUIRE(dout.intact());
  REQUIRE(dout.values() == R);  // dout is const

  for (size_t k = 0; k < op.inputs.size(); k++) {
    const Input& input = op.inputs[k];
    REQUIRE(grads[k].intact());
    if (!input.needs_grad) {
      REQUIRE(grads[k].values() == prior[k]);
      continue;
    }
    std::vector<double> analytic(input.value.size());
    for (size_t i = 0; i < analytic.size(); i++)
      analytic[i] = op.grads_accumulate ? double(grads[k][i]) - prior[k][i] : grads[k][i];

    // Sampled elements: the first, the last and random ones.
    const size_t n = input.value.size();
    std::vector<size_t> idx;
    if (n <= size_t(op.samples)) {
      for (size_t i = 0; i < n; i++) idx.push_back(i);
    } else {
      idx = {0, n - 1};
      while (idx.size() < size_t(op.samples)) idx.push_back(size_t(rng.integer(0, int(n - 1))));
    }
    double diff2 = 0, ref2 = 0, max_diff = 0, max_ref = 0;
    for (size_t i : idx) {
      const float x0 = x[k][i];
      const float h = float(op.step * std::max(1.0, std::abs(double(x0))));
      x[k][i] = x0 + h;
      const float hp = x[k][i] - x0;  // the step actually taken in float
      const double Lp = objective(op, x, R);
      x[k][i] = x0 - h;
      const float hm = x0 - x[k][i];
      const double Lm = objective(op, x, R);
      x[k][i] = x0;
      const double fd = (Lp - Lm) / (double(hp) + hm);
      diff2 += (fd - analytic[i]) * (fd - analytic[i]);
      ref2 += fd * fd;
      max_diff = std::max(max_diff, std::abs(fd - analytic[i]));
      max_ref = std::max(max_ref, std::abs(fd));
    }
    const double norm_err = std::sqrt(diff2) / std::max(std::sqrt(ref2), 1e-12);
    const double max_err = max_diff / std::max(max_ref, 1e-12);

    // One random direction over the whole input.
    std::vector<float> u = rng.normals(n);
    double dir_analytic = 0.0;
    for (size_t i = 0; i < n; i++) dir_analytic += analytic[i] * u[i];
    const float h = float(op.step);
    std::vector<float> x0 = x[k];
    for (size_t i = 0; i < n; i++) x[k][i] = x0[i] + h * u[i];
    const double Lp = objective(op, x, R);
    for (size_t i = 0; i < n; i++) x[k][i] = x0[i] - h * u[i];
    const double Lm = objective(op, x, R);
    x[k] = x0;
    const double dir_fd = (Lp - Lm) / (2.0 * h);
    // <grad, u> for u ~ N(0, I) has the scale |grad|: an error delta in the gradient shows as
    // about |delta| / |grad| here.
    double g2 = 0.0;
    for (double gi : analytic) g2 += gi * gi;
    const double dir_err = std::abs(dir_fd - dir_analytic) / std::max(std::sqrt(g2), 1e-12);

    if (std::getenv("ULYSSES_TEST_VERBOSE"))
      std::printf("%-48s d%-5s norm %.2e  max %.2e  dir %.2e  |g| %.3g\n", op.name.c_str(),
                  input.name.c_str(), norm_err, max_err, dir_err, std::sqrt(ref2));
    INFO(op.name << " d" << input.name << ": norm err " << norm_err << ", max err " << max_err
                 << ", direction err " << dir_err << " (|fd| " << std::sqrt(ref2) << ")");
    CHECK(ref2 > 0.0);  // the test would be void on a zero gradient
    CHECK(norm_err < op.tol);
    CHECK(max_err < 2 * op.tol);
    CHECK(dir_err < op.tol);
  }
}

// ---- the table -------------------------------------------------------------------------------

GradCase embedding_case(int rows, int vocab, int max_pos, int C, bool with_wpe, Rng& rng) {
  auto tokens = rng.integers(rows, 0, vocab - 1);  // repeats on purpose
  auto positions = rng.integers(rows, 0, max_pos - 1);
  GradCase op;
  op.name = fmt::format("embedding rows={} V={} C={}{}", rows, vocab, C, with_wpe ? "" : " no wpe");
  op.inputs = {{"wte", rng.normals(size_t(vocab) * C)},
               {"wpe", rng.normals(size_t(max_pos) * C), with_wpe}};
  op.out_size = size_t(rows) * C;
  op.tol = 1e-3;  // linear: the differences are exact up to rounding (measured ~3e-5)
  op.forward = [=](const Inputs& in, float* out) {
    cpu::embedding_forward(out, tokens.data(), positions.data(), in[0], with_wpe ? in[1] : nullptr,
                           rows, C);
  };
  op.backward = [=](const Inputs&, const float* dout, const Grads& g) {
    cpu::embedding_backward(g[0], g[1], dout, tokens.data(), positions.data(), rows, C);
  };
  return op;
}

GradCase layernorm_case(int rows, int C, Rng& rng) {
  GradCase op;
  op.name = fmt::format("layernorm rows={} C={}", rows, C);
  std::vector<float> inp = rng.normals(size_t(rows) * C, 2.0f);
  for (size_t i = 0; i < inp.size(); i++) inp[i] += float(i % 3);  // nonzero means
  op.inputs = {{"inp", inp}, {"weight", rng.normals(C)}, {"bias", rng.normals(C)}};
  op.out_size = size_t(rows) * C;
  op.forward = [=](const Inputs& in, float* out) {
    Guarded mean(rows), rstd(rows);
    cpu::layernorm_forward(out, mean.data(), rstd.data(), in[0], in[1], in[2], rows, C);
    REQUIRE((mean.intact() && rstd.intact()));
  };
  op.backward = [=](const Inputs& in, const float* dout, const Grads& g) {
    Guarded out(size_t(rows) * C), mean(rows), rstd(rows);
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), in[0], in[1], in[2], rows, C);
    cpu::layernorm_backward(g[0], g[1], g[2], dout, in[0], in[1], mean.data(), rstd.data(), rows,
                            C);
  };
  return op;
}

GradCase matmul_case(int M, int IC, int OC, bool with_bias, bool with_dinp, Rng& rng) {
  GradCase op;
  op.name = fmt::format("matmul M={} IC={} OC={}{}{}", M, IC, OC, with_bias ? "" : " no bias",
                        with_dinp ? "" : " no dinp");
  op.inputs = {{"inp", rng.normals(size_t(M) * IC), with_dinp},
               {"weight", rng.normals(size_t(OC) * IC)},
               {"bias", rng.normals(OC), with_bias}};
  op.out_size = size_t(M) * OC;
  op.tol = 5e-3;  // linear; measured ~3e-4
  op.forward = [=](const Inputs& in, float* out) {
    cpu::matmul_forward(out, in[0], in[1], with_bias ? in[2] : nullptr, M, IC, OC);
  };
  op.backward = [=](const Inputs& in, const float* dout, const Grads& g) {
    cpu::matmul_backward(g[0], g[1], g[2], dout, in[0], in[1], M, IC, OC);
  };
  return op;
}

GradCase gelu_case(int n, Rng& rng) {
  GradCase op;
  op.name = fmt::format("gelu n={}", n);
  std::vector<float> x(n);
  for (float& v : x) v = rng.uniform(-5.0f, 5.0f);
  op.inputs = {{"inp", x}};
  op.out_size = n;
  op.tol = 1e-3;  // measured ~2e-5; a wrong cubic coefficient in gelu' gives ~1e-2
  op.samples = 256;
  op.forward = [=](const Inputs& in, float* out) { cpu::gelu_forward(out, in[0], n); };
  op.backward = [=](const Inputs& in, const float* dout, const Grads& g) {
    cpu::gelu_backward(g[0], in[0], dout, n);
  };
  return op;
}

// rope on n_heads heads of rows with a wider row stride (as q inside a packed qkv row); the
// other columns pass through, so their gradient is dout.
GradCase rope_case(int rows, int n_heads, int d, int extra_heads, int first_pos, Rng& rng) {
  GradCase op;
  op.name = fmt::format("rope rows={} heads={} d={} stride={}", rows, n_heads, d,
                        (n_heads + extra_heads) * d);
  const int64_t stride = int64_t(n_heads + extra_heads) * d;
  std::vector<int32_t> positions(rows);
  for (int r = 0; r < rows; r++) positions[r] = first_pos + r;
  op.inputs = {{"x", rng.normals(size_t(rows) * stride)}};
  op.out_size = size_t(rows) * stride;
  op.tol = 1e-3;  // linear; measured ~4e-5
  op.forward = [=](const Inputs& in, float* out) {
    std::copy(in[0], in[0] + rows * stride, out);
    cpu::rope_forward(out, positions.data(), rows, n_heads, d, stride, 10000.0f);
  };
  op.backward = [=](const Inputs&, const float* dout, const Grads& g) {
    std::vector<float> dx(dout, dout + rows * stride);
    cpu::rope_backward(dx.data(), positions.data(), rows, n_heads, d, stride, 10000.0f);
    for (int64_t i = 0; i < rows * stride; i++) g[0][i] += dx[i];
  };
  return op;
}

GradCase attention_case(int B, int N, int Hq, int Hkv, int d, Rng& rng) {
  GradCase op;
  op.name = fmt::format("attention B={} N={} Hq={} Hkv={} d={}", B, N, Hq, Hkv, d);
  const size_t qkv_size = size_t(B) * N * (Hq + 2 * Hkv) * d;
  const size_t out_size = size_t(B) * N * Hq * d;
  const size_t lse_size = size_t(B) * Hq * N;
  op.inputs = {{"qkv", rng.normals(qkv_size)}};
  op.out_size = out_size;
  op.grads_accumulate = false;
  op.samples = 64;
  op.forward = [=](const Inputs& in, float* out) {
    Guarded lse(lse_size);
    cpu::attention_forward(out, lse.data(), in[0], B, N, Hq, Hkv, d);
    REQUIRE(lse.intact());
  };
  op.backward = [=](const Inputs& in, const float* dout, const Grads& g) {
    Guarded out(out_size), lse(lse_size);
    cpu::attention_forward(out.data(), lse.data(), in[0], B, N, Hq, Hkv, d);
    cpu::attention_backward(g[0], dout, in[0], out.data(), lse.data(), B, N, Hq, Hkv, d);
    REQUIRE((out.intact() && lse.intact()));
  };
  return op;
}

// L = grad_scale * sum(losses): the fused kernel's in-place gradient must be dL/dlogits.
GradCase crossentropy_case(int rows, int V, int Vp, Rng& rng) {
  GradCase op;
  op.name = fmt::format("crossentropy rows={} V={} Vp={}", rows, V, Vp);
  std::vector<int32_t> targets = rng.integers(rows, 0, V - 1);
  targets[1 % rows] = -1;  // an ignored row
  op.inputs = {{"logits", rng.normals(size_t(rows) * Vp, 3.0f)}};
  op.out_size = rows;
  op.grads_accumulate = false;
  op.uniform_dout = true;
  op.step = 1e-2;  // the gradient entries are ~1/V: a smaller step drowns them in fp32 noise
  op.forward = [=](const Inputs& in, float* out) {
    std::vector<float> logits(in[0], in[0] + size_t(rows) * Vp);
    cpu::crossentropy_forward_backward(out, logits.data(), targets.data(), rows, V, Vp, 0.0f);
  };
  op.backward = [=](const Inputs& in, const float* dout, const Grads& g) {
    std::vector<float> losses(rows);
    std::copy(in[0], in[0] + size_t(rows) * Vp, g[0]);
    cpu::crossentropy_forward_backward(losses.data(), g[0], targets.data(), rows, V, Vp, dout[0]);
  };
  return op;
}

}  // namespace

TEST_CASE("every CPU op's gradient matches finite differences", "[kernels][grad]") {
  Rng rng(20240601);
  std::vector<GradCase> table;
  table.push_back(embedding_case(37, 11, 17, 70, true, rng));
  table.push_back(embedding_case(5, 3, 5, 129, false, rng));
  table.push_back(layernorm_case(7, 5, rng));
  table.push_back(layernorm_case(33, 100, rng));
  table.push_back(layernorm_case(1, 64, rng));
  table.push_back(matmul_case(7, 13, 9, true, true, rng));
  table.push_back(matmul_case(65, 64, 33, true, true, rng));
  table.push_back(matmul_case(3, 5, 7, false, false, rng));
  table.push_back(gelu_case(1001, rng));
  table.push_back(rope_case(5, 3, 8, 2, 0, rng));
  table.push_back(rope_case(9, 1, 64, 0, 4090, rng));
  table.push_back(attention_case(1, 1, 1, 1, 8, rng));
  table.push_back(attention_case(2, 7, 2, 2, 16, rng));
  table.push_back(attention_case(1, 65, 8, 2, 16, rng));
  table.push_back(attention_case(1, 130, 4, 1, 8, rng));
  table.push_back(attention_case(2, 70, 2, 1, 64, rng));
  table.push_back(attention_case(1, 129, 1, 1, 16, rng));
  table.push_back(crossentropy_case(9, 37, 40, rng));
  table.push_back(crossentropy_case(3, 1000, 1024, rng));

  uint64_t seed = 1;
  for (const GradCase& op : table) {
    SECTION(op.name) { check_gradients(op, seed); }
    seed++;
  }
}
