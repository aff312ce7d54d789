// Times every fp32 CPU op (kernels/cpu/) at two training shapes and prints ms, GFLOP/s and GB/s:
//   gpt2-124m: B=4, N=64,   C=768, H=12 (d=64), V=50257 (padded 50304), 12 layers
//   long-1k:   B=1, N=1024, C=256, H=4  (d=64), V=50257 (padded 50304), 4 layers
// or one custom shape: bench_kernels B N C H V L. Not a test: it checks nothing.
// Columns: wall ms per call, process CPU ms per call (all threads), GFLOP/s and GB/s from wall,
// calls per training step of a GPT-2-style model of this shape (learned positions: no RoPE) and
// the op's share of the sum over ops of wall ms × calls (an estimate of the step's op time).
// FLOP counts are nominal: 2 per multiply-add in the products; causal attention counts the
// N(N+1)/2 visible pairs only (forward 2 products, backward 5); elementwise ops count a few flops
// per element as noted. GB/s counts each input read and each output written once.
// The footer measures this machine's roofs with the same threads (fma_peak, update_bandwidth) and
// sums each op's floor, max(FLOPs / peak, bytes / bandwidth), over the step: how far the ops
// are from what the hardware allows (column "roof": floor / wall).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include "kernels/cpu/cpu_ops.h"

namespace cpu = ulysses::cpu;

namespace {

struct Shape {
  std::string name;
  int B, N, C, H, V, L;
};

std::vector<float> randn(size_t n, float stddev, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

struct Timing {
  double wall_ms, cpu_ms;  // per call; cpu: the process's CPU time (all threads)
};

// Mean time of f over at least 3 runs and about 0.3 s, after one warm-up run. On a shared machine
// the wall time includes waiting for a core; with one thread the CPU time does not.
Timing time_ms(const std::function<void()>& f) {
  using clock = std::chrono::steady_clock;
  f();
  int reps = 0;
  const auto t0 = clock::now();
  const std::clock_t c0 = std::clock();
  double elapsed = 0.0;
  while (reps < 3 || elapsed < 0.3) {
    f();
    reps++;
    elapsed = std::chrono::duration<double>(clock::now() - t0).count();
  }
  return {1e3 * elapsed / reps, 1e3 * double(std::clock() - c0) / CLOCKS_PER_SEC / reps};
}

struct Row {
  std::string op;
  Timing t;
  double flops, bytes;
  int calls;  // per training step
};

// One thread's share of fma_peak: 10 independent chains of 8-float FMAs on registers (enough to
// cover the FMA latency), `iters` steps each; returns a value that depends on every FMA. A
// function of its own: an OpenMP region's outlined body does not inherit a target attribute.
__attribute__((target("avx2,fma"))) float fma_chains(int64_t iters) {
  constexpr int kChains = 10;
  __m256 acc[kChains];
  for (int c = 0; c < kChains; c++) acc[c] = _mm256_set1_ps(1.0f + 1e-3f * c);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; it++)
#pragma GCC unroll 10
    for (int c = 0; c < kChains; c++) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  float sum = 0.0f;
  for (int c = 0; c < kChains; c++) sum += _mm256_cvtss_f32(acc[c]);
  return sum;
}

// The fp32 multiply-add peak of all OpenMP threads, GFLOP/s (every thread runs fma_chains), best
// of 3 runs; 0 when the CPU has no AVX2 + FMA.
double fma_peak() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0.0;
  constexpr int64_t kIters = 20'000'000;  // per thread: 10 chains x 16 flops x kIters = 3.2 GFLOP
  double best = 0.0;
  for (int run = 0; run < 3; run++) {
    float sink = 0.0f;
    const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    sink += fma_chains(kIters);
    const double secs = omp_get_wtime() - t0;
    if (sink != 0.0f) best = std::max(best, 160.0 * kIters * omp_get_max_threads() / secs / 1e9);
  }
  return best;
}

// Memory bandwidth of two in-place updates a += s·b, c += s·d over 4 × 256 MiB (an optimizer
// step's access pattern: four streams, every line read is written back, so no write-allocate
// traffic; with two streams this machine measured 15 % less), all OpenMP threads, each touching
// its own part first; GB/s counting 24 bytes per element as the table does, best of 5 runs.
double update_bandwidth() {
  const int64_t n = int64_t(64) << 20;
  std::vector<float> a(n), b(n), c(n), d(n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) a[i] = 0.0f, b[i] = 1.0f, c[i] = 0.0f, d[i] = 2.0f;
  double best = 0.0;
  for (int run = 0; run < 5; run++) {
    const double t0 = omp_get_wtime();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
      a[i] += 0.5f * b[i];
      c[i] += 0.5f * d[i];
    }
    best = std::max(best, 24.0 * n / (omp_get_wtime() - t0) / 1e9);
  }
  return a[n / 2] == 2.5f && c[n / 2] == 5.0f ? best : 0.0;
}

struct Roofs {
  double gflops, gbs;  // 0: not measured
  // An op whose data stays in cache beats the memory roof: its floor is then its own time.
  double floor_ms(const Row& r) const {
    if (gflops <= 0.0 || gbs <= 0.0) return 0.0;
    return std::min(r.t.wall_ms, std::max(r.flops / (gflops * 1e6), r.bytes / (gbs * 1e6)));
  }
};

void print(const std::vector<Row>& rows, const Roofs& roofs) {
  double step_ms = 0.0, floor_ms = 0.0;
  for (const Row& r : rows) {
    step_ms += r.t.wall_ms * r.calls;
    floor_ms += roofs.floor_ms(r) * r.calls;
  }
  for (const Row& r : rows)
    std::printf("  %-28s %10.3f ms %10.3f cpu-ms %9.2f GFLOP/s %8.2f GB/s %4d x %5.1f%% roof %3.0f%%\n",
                r.op.c_str(), r.t.wall_ms, r.t.cpu_ms, r.flops / (r.t.wall_ms * 1e6),
                r.bytes / (r.t.wall_ms * 1e6), r.calls, 100.0 * r.t.wall_ms * r.calls / step_ms,
                100.0 * roofs.floor_ms(r) / r.t.wall_ms);
  std::printf("  sum over ops of ms x calls: %.1f ms per step\n", step_ms);
  if (floor_ms > 0.0)
    std::printf("  roofs of this machine, %d threads: fp32 FMA peak %.1f GFLOP/s, memory %.1f GB/s;\n"
                "  sum over ops of max(FLOPs / peak, bytes / memory) x calls: %.1f ms per step "
                "(the ops take %.2fx that)\n",
                omp_get_max_threads(), roofs.gflops, roofs.gbs, floor_ms, step_ms / floor_ms);
  else
    std::printf("  roofs not measured (no AVX2 + FMA)\n");
}

void bench(const Shape& s, const Roofs& roofs) {
  std::mt19937 gen(1234);
  const int B = s.B, N = s.N, C = s.C, H = s.H, d = C / H, Vp = (s.V + 127) / 128 * 128;
  const int64_t R = int64_t(B) * N;
  std::printf("%s: B=%d N=%d C=%d H=%d d=%d V=%d Vp=%d L=%d, %d OpenMP threads\n", s.name.c_str(),
              B, N, C, H, d, s.V, Vp, s.L, omp_get_max_threads());

  std::vector<int32_t> tokens(R), positions(R), targets(R);
  for (int64_t r = 0; r < R; r++) {
    tokens[r] = int32_t(gen() % s.V);
    targets[r] = int32_t(gen() % s.V);
    positions[r] = int32_t(r % N);
  }
  auto wte = randn(size_t(Vp) * C, 0.02f, gen), wpe = randn(size_t(N) * C, 0.02f, gen);
  auto x = randn(R * C, 1.0f, gen), dx = randn(R * C, 1.0f, gen), y = randn(R * C, 1.0f, gen);
  auto dwte = std::vector<float>(wte.size()), dwpe = std::vector<float>(wpe.size());
  std::vector<float> lnw(C, 1.0f), lnb(C), dlnw(C), dlnb(C), mean(R), rstd(R);

  std::vector<Row> rows;
  // calls per step: once, per layer, or twice per layer plus the final LayerNorm
  const int once = 1, per_layer = s.L, layernorms = 2 * s.L + 1;
  int calls = once;
  auto report = [&](const std::string& op, Timing t, double flops, double bytes) {
    rows.push_back({op, t, flops, bytes, calls});
  };
  const double RC = double(R) * C;
  report("embedding_forward", time_ms([&] {
    cpu::embedding_forward(y.data(), tokens.data(), positions.data(), wte.data(), wpe.data(), R, C);
  }), RC, 12.0 * RC);
  report("embedding_backward", time_ms([&] {
    cpu::embedding_backward(dwte.data(), dwpe.data(), dx.data(), tokens.data(), positions.data(), R, C);
  }), 2 * RC, 20.0 * RC);
  calls = layernorms;
  report("layernorm_forward", time_ms([&] {
    cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), lnw.data(), lnb.data(), R, C);
  }), 8 * RC, 8.0 * RC);
  report("layernorm_backward", time_ms([&] {
    cpu::layernorm_backward(y.data(), dlnw.data(), dlnb.data(), dx.data(), x.data(), lnw.data(),
                            mean.data(), rstd.data(), R, C);
  }), 14 * RC, 16.0 * RC);

  calls = per_layer;
  // the layer's products: qkv (C -> 3C), attention projection (C -> C), MLP (C -> 4C -> C)
  struct Mm { const char* name; int IC, OC; };
  const Mm mms[] = {{"qkv", C, 3 * C}, {"attn_proj", C, C}, {"fc", C, 4 * C}, {"fc_proj", 4 * C, C}};
  for (const Mm& m : mms) {
    auto inp = randn(R * m.IC, 1.0f, gen), w = randn(size_t(m.OC) * m.IC, 0.02f, gen);
    auto b = randn(m.OC, 0.02f, gen), out = std::vector<float>(R * m.OC);
    auto dout = randn(R * m.OC, 1.0f, gen), dinp = std::vector<float>(inp.size());
    std::vector<float> dw(w.size()), db(m.OC);
    const double f = 2.0 * R * m.IC * m.OC;
    const double io = 4.0 * (double(R) * m.IC + double(m.OC) * m.IC + double(R) * m.OC);
    report(std::string("matmul_forward ") + m.name, time_ms([&] {
      cpu::matmul_forward(out.data(), inp.data(), w.data(), b.data(), R, m.IC, m.OC);
    }), f, io);
    report(std::string("matmul_backward ") + m.name, time_ms([&] {
      cpu::matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), R,
                           m.IC, m.OC);
    }), 2 * f, 2 * io);
  }

  {
    const int64_t n = R * 4 * C;
    auto a = randn(n, 1.0f, gen), g = randn(n, 1.0f, gen), out = std::vector<float>(n);
    report("gelu_forward", time_ms([&] { cpu::gelu_forward(out.data(), a.data(), n); }),
           10.0 * n, 8.0 * n);
    report("gelu_backward", time_ms([&] { cpu::gelu_backward(out.data(), a.data(), g.data(), n); }),
           16.0 * n, 16.0 * n);
  }
  calls = 0;  // fused into the next LayerNorm in the model
  report("residual_forward", time_ms([&] { cpu::residual_forward(y.data(), x.data(), dx.data(), R * C); }),
         RC, 12.0 * RC);

  {
    const int H3 = 3 * H;
    auto qkv = randn(R * H3 * d, 1.0f, gen), dqkv = std::vector<float>(qkv.size());
    auto out = std::vector<float>(R * H * d), lse = std::vector<float>(R * H);
    auto dout = randn(out.size(), 1.0f, gen);
    // q and k of every row: 2H heads of d, 6 flops per pair
    calls = 0;  // GPT-2 has learned positions
    report("rope_forward (q and k)", time_ms([&] {
      cpu::rope_forward(qkv.data(), positions.data(), R, 2 * H, d, int64_t(H3) * d, 10000.0f);
    }), 3.0 * R * 2 * H * d, 8.0 * R * 2 * H * d);
    std::vector<float> qkv0 = randn(qkv.size(), 1.0f, gen);
    qkv = qkv0;  // rope_forward ran many times in place: start again from unit-scale values
    const double pairs = double(B) * H * (double(N) * (N + 1) / 2);
    const double io = 4.0 * (qkv.size() + out.size());
    calls = per_layer;
    report("attention_forward", time_ms([&] {
      cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, N, H, H, d);
    }), 2 * 2.0 * pairs * d, io);
    report("attention_backward", time_ms([&] {
      cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), B, N,
                              H, H, d);
    }), 5 * 2.0 * pairs * d, 2 * io);
  }

  {
    // the LM head and the fused loss on all rows at once (the trainer may chunk the rows)
    std::vector<float> logits(R * Vp), losses(R), dlogits(R * Vp);
    auto dl = randn(R * Vp, 1.0f, gen);
    const double f = 2.0 * R * C * Vp;
    calls = once;
    report("matmul_forward lm_head", time_ms([&] {
      cpu::matmul_forward(logits.data(), x.data(), wte.data(), nullptr, R, C, Vp);
    }), f, 4.0 * (RC + double(Vp) * C + double(R) * Vp));
    report("matmul_backward lm_head", time_ms([&] {
      cpu::matmul_backward(dx.data(), dwte.data(), nullptr, dl.data(), x.data(), wte.data(), R, C, Vp);
    }), 2 * f, 8.0 * (RC + double(Vp) * C + double(R) * Vp));
    auto logits0 = randn(R * Vp, 2.0f, gen);
    // the kernel writes the gradient over its input: refresh it each time (the copy is timed too)
    report("crossentropy (+copy)", time_ms([&] {
      std::copy(logits0.begin(), logits0.end(), logits.begin());
      cpu::crossentropy_forward_backward(losses.data(), logits.data(), targets.data(), R, s.V, Vp,
                                         1.0f / R);
    }), 5.0 * R * s.V, 12.0 * R * Vp);
  }

  {
    // one optimizer step over the whole model: wte, wpe and L layers of about 12 C^2
    const int64_t n = int64_t(Vp) * C + int64_t(N) * C + int64_t(s.L) * (12LL * C * C + 13LL * C);
    std::vector<float> p(n, 0.01f), m(n), v(n), g(n, 1e-3f);
    report("adamw_update (all params)", time_ms([&] {
      cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f,
                        1.0f, 1);
    }), 15.0 * n, 28.0 * n);
    volatile double sink = 0.0;
    report("sum_squares (all grads)", time_ms([&] { sink = sink + cpu::sum_squares(g.data(), n); }),
           2.0 * n, 4.0 * n);
  }
  print(rows, roofs);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Shape> shapes;
  if (argc == 7) {
    shapes.push_back({"custom", std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]),
                      std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6])});
  } else if (argc == 1) {
    shapes.push_back({"gpt2-124m", 4, 64, 768, 12, 50257, 12});
    shapes.push_back({"long-1k", 1, 1024, 256, 4, 50257, 4});
  } else {
    std::fprintf(stderr, "usage: bench_kernels [B N C H V L]\n");
    return 2;
  }
  const double peak = fma_peak();
  const Roofs roofs{peak, peak > 0.0 ? update_bandwidth() : 0.0};
  for (const Shape& s : shapes) {
    if (s.B <= 0 || s.N <= 0 || s.C <= 0 || s.H <= 0 || s.C % s.H || (s.C / s.H) % 2 || s.V <= 0) {
      std::fprintf(stderr, "bench_kernels: bad shape (need positive sizes, H | C, even C/H)\n");
      return 2;
    }
    bench(s, roofs);
  }
  return 0;
}
