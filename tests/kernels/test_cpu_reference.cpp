// CPU forwards and updates against float64 references: the vectorisable exp/tanh, attention (with GQA and with RoPE) vs a
// plain O(N^2) softmax, cross-entropy (ignored targets, padding, grad_scale = 0), AdamW over
// several steps, sum_squares, layernorm, matmul, gelu, embedding, residual; the RoPE transpose
// identity; and bitwise determinism across thread counts. Outputs carry sentinel guards.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>

#include "kernel_test_util.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/vec_math.h"

namespace cpu = ulysses::cpu;
using ulysses::test::bitwise_equal;
using ulysses::test::Guarded;
using ulysses::test::max_rel_error;
using ulysses::test::Rng;
using ulysses::test::with_threads;

namespace {

// Rotates heads [head0, head0 + n_heads) of each row of a [rows, H3, d] double buffer.
void rope_reference(std::vector<double>& x, const std::vector<int32_t>& positions, int rows,
                    int H3, int head0, int n_heads, int d, double base) {
  for (int r = 0; r < rows; r++)
    for (int h = head0; h < head0 + n_heads; h++) {
      double* v = x.data() + (size_t(r) * H3 + h) * d;
      for (int i = 0; i < d / 2; i++) {
        const double theta = positions[r] * std::pow(base, -2.0 * i / d);
        const double a = v[i], b = v[i + d / 2];
        v[i] = a * std::cos(theta) - b * std::sin(theta);
        v[i + d / 2] = a * std::sin(theta) + b * std::cos(theta);
      }
    }
}

// The textbook causal attention in float64: softmax over the masked score row.
void attention_reference(std::vector<double>& out, std::vector<double>& lse,
                         const std::vector<double>& qkv, int B, int N, int Hq, int Hkv, int d) {
  const int H3 = Hq + 2 * Hkv;
  out.assign(size_t(B) * N * Hq * d, 0.0);
  lse.assign(size_t(B) * Hq * N, 0.0);
  auto at = [&](int b, int t, int head) { return qkv.data() + ((size_t(b) * N + t) * H3 + head) * d; };
  std::vector<double> s(N);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < Hq; h++) {
      const int kvh = h / (Hq / Hkv);
      for (int i = 0; i < N; i++) {
        double m = -1e300;
        for (int j = 0; j <= i; j++) {
          double dot = 0.0;
          for (int c = 0; c < d; c++) dot += at(b, i, h)[c] * at(b, j, Hq + kvh)[c];
          s[j] = dot / std::sqrt(double(d));
          m = std::max(m, s[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= i; j++) sum += std::exp(s[j] - m);
        double* o = out.data() + ((size_t(b) * N + i) * Hq + h) * d;
        for (int j = 0; j <= i; j++) {
          const double p = std::exp(s[j] - m) / sum;
          for (int c = 0; c < d; c++) o[c] += p * at(b, j, Hq + Hkv + kvh)[c];
        }
        lse[(size_t(b) * Hq + h) * N + i] = m + std::log(sum);
      }
    }
}

}  // namespace

TEST_CASE("exp_approx and tanh_approx against float64", "[kernels][math]") {
  double exp_err = 0.0, tanh_err = 0.0;
  for (int i = 0; i <= 400000; i++) {
    const float x = -87.3f + (88.3f + 87.3f) * float(i) / 400000.0f;
    const double ref = std::exp(double(x));
    exp_err = std::max(exp_err, std::abs(double(cpu::exp_approx(x)) - ref) / ref);
    const float u = -12.0f + 24.0f * float(i) / 400000.0f;
    tanh_err = std::max(tanh_err, std::abs(double(cpu::tanh_approx(u)) - std::tanh(double(u))));
  }
  CHECK(exp_err < 1.5e-7);  // about one ulp
  CHECK(tanh_err < 3e-7);
  CHECK(cpu::exp_approx(-INFINITY) == 0.0f);
  CHECK(cpu::exp_approx(-100.0f) == 0.0f);
  CHECK(cpu::exp_approx(0.0f) == 1.0f);
  CHECK(std::isfinite(cpu::exp_approx(1000.0f)));
  CHECK(cpu::tanh_approx(50.0f) == 1.0f);
  CHECK(cpu::tanh_approx(-50.0f) == -1.0f);
  const float row[] = {-3.0f, -0.0f, -7.5f, 2.5f, -1e30f, 2.25f};
  CHECK(cpu::max_of(row, 6) == 2.5f);
  CHECK(cpu::max_of(row, 3) == 0.0f);
  CHECK(cpu::max_of(row + 2, 1) == -7.5f);
  CHECK(cpu::sum_of(row, 4) == -8.0);
}

TEST_CASE("attention_forward matches a float64 softmax reference", "[kernels][attention]") {
  struct Shape { int B, N, Hq, Hkv, d; bool rope; };
  const Shape shapes[] = {{1, 1, 1, 1, 8, false},    {2, 5, 2, 2, 16, false},
                          {1, 64, 4, 4, 64, false},  {1, 100, 8, 2, 16, false},
                          {1, 257, 4, 1, 32, false}, {2, 65, 6, 3, 8, false},
                          {1, 5, 2, 1, 16, true},    {1, 100, 8, 2, 16, true},
                          {1, 257, 2, 2, 64, true}};
  Rng rng(7);
  for (const Shape& s : shapes) {
    INFO("B=" << s.B << " N=" << s.N << " Hq=" << s.Hq << " Hkv=" << s.Hkv << " d=" << s.d
              << " rope=" << s.rope);
    const int H3 = s.Hq + 2 * s.Hkv;
    const int rows = s.B * s.N;
    std::vector<float> qkv = rng.normals(size_t(rows) * H3 * s.d, 1.5f);
    std::vector<double> qkv64(qkv.begin(), qkv.end());
    if (s.rope) {
      // global positions of a later sequence shard, as under sequence parallelism
      std::vector<int32_t> positions(rows);
      for (int r = 0; r < rows; r++) positions[r] = 3000 + r % s.N;
      const int64_t stride = int64_t(H3) * s.d;
      cpu::rope_forward(qkv.data(), positions.data(), rows, s.Hq, s.d, stride, 10000.0f);
      cpu::rope_forward(qkv.data() + s.Hq * s.d, positions.data(), rows, s.Hkv, s.d, stride,
                        10000.0f);
      rope_reference(qkv64, positions, rows, H3, 0, s.Hq + s.Hkv, s.d, 10000.0);
    }
    Guarded out(size_t(rows) * s.Hq * s.d), lse(size_t(s.B) * s.Hq * s.N);
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.N, s.Hq, s.Hkv, s.d);
    REQUIRE(out.intact());
    REQUIRE(lse.intact());
    std::vector<double> out64, lse64;
    attention_reference(out64, lse64, qkv64, s.B, s.N, s.Hq, s.Hkv, s.d);
    CHECK(max_rel_error(out.values(), out64) < 2e-5);
    CHECK(max_rel_error(lse.values(), lse64) < 2e-6);
  }
}

// Random q, k, v and output gradient of one attention shape.
struct AttentionCase {
  int B, N, Hq, Hkv, d;
  std::vector<float> qkv, dout;
  AttentionCase(int B_, int N_, int Hq_, int Hkv_, int d_, uint32_t seed)
      : B(B_), N(N_), Hq(Hq_), Hkv(Hkv_), d(d_) {
    Rng rng(seed);
    qkv = rng.normals(size_t(B) * N * (Hq + 2 * Hkv) * d);
    dout = rng.normals(size_t(B) * N * Hq * d);
  }
  // out, lse and dqkv (which starts at 7s: it is overwritten) of forward then backward on
  // `threads` threads, one after the other in one vector; in the caller's scratch fs / bs when
  // given, else in the kernels' own.
  std::vector<float> run(int threads, Guarded* fs = nullptr, Guarded* bs = nullptr) const {
    std::vector<float> out(dout.size()), lse(size_t(B) * Hq * N), dqkv(qkv.size(), 7.0f);
    with_threads(threads, [&] {
      cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, N, Hq, Hkv, d,
                             fs ? fs->data() : nullptr, fs ? fs->size() : 0);
      cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), B, N,
                              Hq, Hkv, d, bs ? bs->data() : nullptr, bs ? bs->size() : 0);
    });
    out.insert(out.end(), lse.begin(), lse.end());
    out.insert(out.end(), dqkv.begin(), dqkv.end());
    return out;
  }
};

TEST_CASE("attention is deterministic across thread counts", "[kernels][attention]") {
  const AttentionCase c(2, 150, 4, 2, 16, 8);
  CHECK(bitwise_equal(c.run(1), c.run(2)));
}

// B = 1 with one kv head (MQA): one thread takes the fused backward schedule, 2 and 3 threads the
// split one (parallel over key tiles, then query tiles); forward is parallel over query tiles.
// N = 300 gives 5 tiles, the last one partial. Everything must agree to the bit.
TEST_CASE("attention at B = 1, one kv head: bitwise the same for 1, 2 and 3 threads",
          "[kernels][attention]") {
  const AttentionCase c(1, 300, 3, 1, 24, 18);
  const auto one = c.run(1);
  CHECK(bitwise_equal(one, c.run(2)));
  CHECK(bitwise_equal(one, c.run(3)));
}

// The model passes its context's scratch, which holds whatever an earlier op left there. A scratch
// full of NaNs, exactly as long as attention_*_scratch_floats says (guarded on both sides), must
// give the bits of the calls that allocate their own: with 1 thread (fused backward schedule)
// and with 2 (split). One float short is refused before anything is written.
TEST_CASE("attention in a caller's scratch: any contents, the declared size, the same bits",
          "[kernels][attention]") {
  const AttentionCase c(1, 200, 4, 1, 24, 19);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int threads : {1, 2}) {
    INFO(threads << " threads");
    Guarded fs(cpu::attention_forward_scratch_floats(c.B, c.N, c.Hq, c.Hkv, c.d, threads), nan);
    Guarded bs(cpu::attention_backward_scratch_floats(c.B, c.N, c.Hq, c.Hkv, c.d, threads), nan);
    CHECK(bitwise_equal(c.run(threads), c.run(threads, &fs, &bs)));
    CHECK(fs.intact());
    CHECK(bs.intact());
    const auto whole = c.run(threads);
    std::vector<float> out(whole.begin(), whole.begin() + c.dout.size());
    std::vector<float> lse(whole.begin() + c.dout.size(), whole.end() - c.qkv.size());
    std::vector<float> dqkv(c.qkv.size(), 7.0f);
    with_threads(threads, [&] {
      CHECK_THROWS_WITH(cpu::attention_backward(dqkv.data(), c.dout.data(), c.qkv.data(), out.data(),
                                                lse.data(), c.B, c.N, c.Hq, c.Hkv, c.d, bs.data(),
                                                bs.size() - 1),
                        Catch::Contains("attention_backward: scratch of"));
    });
    CHECK(std::all_of(dqkv.begin(), dqkv.end(), [](float x) { return x == 7.0f; }));
  }
}

TEST_CASE("crossentropy: losses, ignored targets, padding, grad_scale", "[kernels][crossentropy]") {
  const int rows = 6, V = 50, Vp = 64;
  Rng rng(9);
  std::vector<float> logits = rng.normals(size_t(rows) * Vp, 4.0f);
  for (int v = 0; v < Vp; v++) logits[2 * Vp + v] += 500.0f;  // a row that overflows a naive exp
  std::vector<int32_t> targets = {3, -1, 49, 0, -1, 17};
  const float grad_scale = 0.25f;

  std::vector<double> loss64(rows, 0.0), grad64(size_t(rows) * Vp, 0.0);
  for (int r = 0; r < rows; r++) {
    if (targets[r] < 0) continue;
    const float* x = logits.data() + size_t(r) * Vp;
    double m = -1e300, sum = 0.0;
    for (int v = 0; v < V; v++) m = std::max(m, double(x[v]));
    for (int v = 0; v < V; v++) sum += std::exp(x[v] - m);
    loss64[r] = std::log(sum) + m - x[targets[r]];
    for (int v = 0; v < V; v++)
      grad64[size_t(r) * Vp + v] = (std::exp(x[v] - m) / sum - (v == targets[r])) * grad_scale;
  }

  SECTION("with gradient") {
    Guarded losses(rows, 123.0f), g(logits);
    cpu::crossentropy_forward_backward(losses.data(), g.data(), targets.data(), rows, V, Vp,
                                       grad_scale);
    REQUIRE((losses.intact() && g.intact()));
    CHECK(max_rel_error(losses.values(), loss64) < 1e-6);
    CHECK(max_rel_error(g.values(), grad64) < 1e-6);
    for (int r = 0; r < rows; r++) {
      for (int v = V; v < Vp; v++) CHECK(g[size_t(r) * Vp + v] == 0.0f);  // padding
      if (targets[r] < 0) {
        CHECK(losses[r] == 0.0f);
        for (int v = 0; v < Vp; v++) CHECK(g[size_t(r) * Vp + v] == 0.0f);
      }
    }
  }
  SECTION("grad_scale = 0 computes the losses and leaves the logits untouched") {
    Guarded losses(rows, 123.0f), g(logits);
    cpu::crossentropy_forward_backward(losses.data(), g.data(), targets.data(), rows, V, Vp, 0.0f);
    REQUIRE((losses.intact() && g.intact()));
    CHECK(max_rel_error(losses.values(), loss64) < 1e-6);
    CHECK(bitwise_equal(g.values(), logits));
  }
  SECTION("GPT-2 vocabulary") {
    const int r2 = 3, V2 = 50257, Vp2 = 50304;
    std::vector<float> x = rng.normals(size_t(r2) * Vp2, 2.0f);
    std::vector<int32_t> t = {50256, 0, 1234};
    Guarded losses(r2), g(x);
    cpu::crossentropy_forward_backward(losses.data(), g.data(), t.data(), r2, V2, Vp2, 1.0f);
    REQUIRE((losses.intact() && g.intact()));
    for (int r = 0; r < r2; r++) {
      double m = -1e300, sum = 0.0, gsum = 0.0;
      const float* xr = x.data() + size_t(r) * Vp2;
      for (int v = 0; v < V2; v++) m = std::max(m, double(xr[v]));
      for (int v = 0; v < V2; v++) sum += std::exp(xr[v] - m);
      for (int v = 0; v < Vp2; v++) gsum += g[size_t(r) * Vp2 + v];
      CHECK(std::abs(losses[r] - (std::log(sum) + m - xr[t[r]])) < 1e-5);
      CHECK(std::abs(gsum) < 1e-5);  // softmax sums to one, minus the one-hot
    }
  }
}

TEST_CASE("adamw_update matches a float64 reimplementation over several steps",
          "[kernels][adamw]") {
  for (int64_t n : {int64_t(1), int64_t(1000), int64_t(70001)}) {
    INFO("n=" << n);
    Rng rng(10);
    const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.5f;
    Guarded p(rng.normals(n)), m(n), v(n);
    std::vector<double> p64(p.data(), p.data() + n), m64(n, 0.0), v64(n, 0.0);
    const std::vector<double> p0 = p64;
    for (int t = 1; t <= 6; t++) {
      std::vector<float> g = rng.normals(n, t == 3 ? 1e-4f : 1.0f);
      cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, scale, t);
      for (int64_t i = 0; i < n; i++) {
        const double gi = double(g[i]) * scale;
        m64[i] = b1 * m64[i] + (1.0 - b1) * gi;
        v64[i] = b2 * v64[i] + (1.0 - b2) * gi * gi;
        const double mhat = m64[i] / (1.0 - std::pow(double(b1), t));
        const double vhat = v64[i] / (1.0 - std::pow(double(b2), t));
        p64[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p64[i]);
      }
    }
    REQUIRE((p.intact() && m.intact() && v.intact()));
    // the error against the size of the change the optimizer made
    std::vector<double> change(n), err(n);
    for (int64_t i = 0; i < n; i++) {
      change[i] = p64[i] - p0[i];
      err[i] = double(p[i]) - p0[i];
    }
    CHECK(max_rel_error(err, change) < 1e-4);
    CHECK(max_rel_error(m.values(), m64) < 1e-5);
    CHECK(max_rel_error(v.values(), v64) < 1e-5);
  }
}

TEST_CASE("sum_squares matches float64 and is the same for any thread count", "[kernels][norm]") {
  CHECK(cpu::sum_squares(nullptr, 0) == 0.0);
  const float one[] = {-3.0f};
  CHECK(cpu::sum_squares(one, 1) == 9.0);
  Rng rng(11);
  const int64_t n = 1000003;
  std::vector<float> x = rng.normals(n, 3.0f);
  long double ref = 0.0L;
  for (float v : x) ref += (long double)v * v;
  double s1 = 0, s2 = 0;
  with_threads(1, [&] { s1 = cpu::sum_squares(x.data(), n); });
  with_threads(2, [&] { s2 = cpu::sum_squares(x.data(), n); });
  CHECK(std::abs(s1 - double(ref)) / double(ref) < 1e-12);
  CHECK(s1 == s2);
}

TEST_CASE("rope: forward vs float64, and backward is its transpose", "[kernels][rope]") {
  Rng rng(12);
  const int rows = 11, heads = 3, d = 32, H3 = 5;  // 2 untouched heads per row
  const int64_t stride = int64_t(H3) * d;
  std::vector<int32_t> positions(rows);
  for (int r = 0; r < rows; r++) positions[r] = r == 0 ? 0 : 1000000 - 7 * r;
  std::vector<float> x = rng.normals(size_t(rows) * stride), y = rng.normals(x.size());

  Guarded rx(x);
  cpu::rope_forward(rx.data(), positions.data(), rows, heads, d, stride, 10000.0f);
  REQUIRE(rx.intact());
  std::vector<double> x64(x.begin(), x.end());
  rope_reference(x64, positions, rows, H3, 0, heads, d, 10000.0);
  CHECK(max_rel_error(rx.values(), x64) < 1e-6);
  for (int r = 0; r < rows; r++)  // heads beyond n_heads are untouched
    for (int64_t c = int64_t(heads) * d; c < stride; c++)
      CHECK(rx[r * stride + c] == x[r * stride + c]);

  // <R x, y> = <x, R^T y>
  Guarded ry(y);
  cpu::rope_backward(ry.data(), positions.data(), rows, heads, d, stride, 10000.0f);
  REQUIRE(ry.intact());
  double lhs = 0.0, rhs = 0.0, scale = 0.0;
  for (size_t i = 0; i < x.size(); i++) {
    lhs += double(rx[i]) * y[i];
    rhs += double(x[i]) * ry[i];
    scale += std::abs(double(x[i]) * y[i]);
  }
  CHECK(std::abs(lhs - rhs) / scale < 1e-6);
  // and R^T R = I
  cpu::rope_backward(rx.data(), positions.data(), rows, heads, d, stride, 10000.0f);
  CHECK(max_rel_error(rx.values(), std::vector<double>(x.begin(), x.end())) < 1e-6);
}

TEST_CASE("layernorm, matmul, gelu, embedding, residual forwards vs float64",
          "[kernels][forward]") {
  Rng rng(13);
  SECTION("layernorm") {
    const int rows = 9, C = 200;
    std::vector<float> x = rng.normals(size_t(rows) * C), w = rng.normals(C), b = rng.normals(C);
    for (float& v : x) v = 100.0f + 0.1f * v;  // a large mean: needs a stable variance
    Guarded out(size_t(rows) * C), mean(rows), rstd(rows);
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(),
                           rows, C);
    REQUIRE((out.intact() && mean.intact() && rstd.intact()));
    std::vector<double> out64(out.size()), mean64(rows), rstd64(rows);
    for (int r = 0; r < rows; r++) {
      double m = 0, v = 0;
      for (int c = 0; c < C; c++) m += x[size_t(r) * C + c];
      m /= C;
      for (int c = 0; c < C; c++) v += (x[size_t(r) * C + c] - m) * (x[size_t(r) * C + c] - m);
      const double rs = 1.0 / std::sqrt(v / C + 1e-5);
      for (int c = 0; c < C; c++)
        out64[size_t(r) * C + c] = (x[size_t(r) * C + c] - m) * rs * w[c] + b[c];
      mean64[r] = m;
      rstd64[r] = rs;
    }
    CHECK(max_rel_error(out.values(), out64) < 1e-4);  // x carries only ~1e-5 relative detail
    CHECK(max_rel_error(mean.values(), mean64) < 1e-6);
    CHECK(max_rel_error(rstd.values(), rstd64) < 1e-5);
  }
  SECTION("matmul") {
    const int M = 65, IC = 70, OC = 33;
    std::vector<float> x = rng.normals(size_t(M) * IC), w = rng.normals(size_t(OC) * IC),
                       b = rng.normals(OC);
    for (bool with_bias : {true, false}) {
      Guarded out(size_t(M) * OC, 1e30f);
      cpu::matmul_forward(out.data(), x.data(), w.data(), with_bias ? b.data() : nullptr, M, IC,
                          OC);
      REQUIRE(out.intact());
      std::vector<double> ref(out.size());
      for (int r = 0; r < M; r++)
        for (int o = 0; o < OC; o++) {
          double s = with_bias ? b[o] : 0.0;
          for (int c = 0; c < IC; c++) s += double(x[size_t(r) * IC + c]) * w[size_t(o) * IC + c];
          ref[size_t(r) * OC + o] = s;
        }
      CHECK(max_rel_error(out.values(), ref) < 1e-5);
    }
  }
  SECTION("gelu") {
    const int n = 777;
    std::vector<float> x(n);
    for (float& v : x) v = rng.uniform(-8.0f, 8.0f);
    Guarded out(n);
    cpu::gelu_forward(out.data(), x.data(), n);
    REQUIRE(out.intact());
    std::vector<double> ref(n);
    for (int i = 0; i < n; i++) {
      const double u = std::sqrt(2.0 / M_PI) * (x[i] + 0.044715 * double(x[i]) * x[i] * x[i]);
      ref[i] = 0.5 * x[i] * (1.0 + std::tanh(u));
    }
    CHECK(max_rel_error(out.values(), ref) < 1e-6);
  }
  SECTION("embedding and residual") {
    const int rows = 13, C = 70, vocab = 5, max_pos = 20;
    auto wte = rng.normals(size_t(vocab) * C), wpe = rng.normals(size_t(max_pos) * C);
    auto tokens = rng.integers(rows, 0, vocab - 1), positions = rng.integers(rows, 0, max_pos - 1);
    Guarded out(size_t(rows) * C), out_nopos(size_t(rows) * C);
    cpu::embedding_forward(out.data(), tokens.data(), positions.data(), wte.data(), wpe.data(),
                           rows, C);
    cpu::embedding_forward(out_nopos.data(), tokens.data(), positions.data(), wte.data(), nullptr,
                           rows, C);
    REQUIRE((out.intact() && out_nopos.intact()));
    for (int r = 0; r < rows; r++)
      for (int c = 0; c < C; c++) {
        const float w = wte[size_t(tokens[r]) * C + c], p = wpe[size_t(positions[r]) * C + c];
        CHECK(out[size_t(r) * C + c] == w + p);
        CHECK(out_nopos[size_t(r) * C + c] == w);
      }
    // residual in place: out aliases a
    std::vector<float> a = out.values(), expect(a.size());
    for (size_t i = 0; i < a.size(); i++) expect[i] = a[i] + out_nopos[i];
    cpu::residual_forward(out.data(), out.data(), out_nopos.data(), int64_t(a.size()));
    REQUIRE(out.intact());
    CHECK(bitwise_equal(out.values(), expect));
  }
}

TEST_CASE("parameter-gradient reductions are deterministic across thread counts",
          "[kernels][determinism]") {
  Rng rng(14);
  const int rows = 517, C = 200, vocab = 7;  // large enough for the OpenMP paths
  auto x = rng.normals(size_t(rows) * C), dout = rng.normals(size_t(rows) * C);
  auto w = rng.normals(C), b = rng.normals(C);
  auto tokens = rng.integers(rows, 0, vocab - 1), positions = rng.integers(rows, 0, 63);
  auto run = [&](int threads) {
    std::vector<float> dwte(size_t(vocab) * C), dwpe(size_t(64) * C), dx(x.size()), dw(C), db(C),
        out(x.size()), mean(rows), rstd(rows), dbias(C);
    with_threads(threads, [&] {
      cpu::embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(),
                              positions.data(), rows, C);
      cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(),
                             rows, C);
      cpu::layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(),
                              mean.data(), rstd.data(), rows, C);
      cpu::matmul_backward(nullptr, nullptr, dbias.data(), dout.data(), x.data(), nullptr, rows,
                           C, C);
    });
    for (auto* v : {&dwpe, &dx, &dw, &db, &dbias}) dwte.insert(dwte.end(), v->begin(), v->end());
    return dwte;
  };
  CHECK(bitwise_equal(run(1), run(2)));
}
