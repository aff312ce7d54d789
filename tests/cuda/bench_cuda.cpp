// Kernel benchmark (not a CTest): times every CUDA op at GPT-2-small-like shapes and reports
// GB/s (memory-bound ops, counting the bytes each op must move at least once) or TFLOP/s
// (matmul, attention), next to the ceilings measured in the same run: device-to-device copy
// bandwidth (cudaMemcpy of 1 GiB, read + write counted) and cuBLASLt bf16 GEMM at 8192^3.
// Attention: causal, head dim 128, N = 4K, 16K, 64K, the flash kernels and cuDNN's fused SDPA
// (runtime.attention = cudnn) on the same inputs; FLOPs counted as in FlashAttention: forward
// 4*B*H*N^2*d / 2 (causal half), backward 2.5x the forward. The `attention fwd+bwd` line gives
// both and the ratio flash/cuDNN (target >= 0.6).
//   bench_cuda [--quick]      (--quick: fewer repetitions, attention up to 16K only)
// Output: one line per op; the last lines `ceiling ...` and `attention ...` are what
// scripts/device/check.sh summarises.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace {

using namespace ulysses;
using namespace ulysses::cuda::test;
using cuda::bf16;

// Mean milliseconds per call over `reps` calls after two warm-up calls.
double time_ms(const std::function<void()>& f, int reps) {
  f();
  f();
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  CUDA_CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) f();
  CUDA_CHECK(cudaEventRecord(b));
  CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  return double(ms) / reps;
}

// Random bf16 device data without a host round trip of the full size: a 1M pattern, repeated.
template <typename T>
void fill_random(DeviceBuffer<T>& buf, uint64_t seed, float scale = 1.0f) {
  Rng rng(seed);
  const size_t chunk = std::min<size_t>(buf.size(), size_t(1) << 20);
  std::vector<T> host(chunk);
  for (auto& x : host) {
    if constexpr (std::is_same_v<T, bf16>) x = __float2bfloat16(rng.nonzero(scale));
    else x = T(rng.nonzero(scale));
  }
  for (size_t off = 0; off < buf.size(); off += chunk)
    CUDA_CHECK(cudaMemcpy(buf.get() + off, host.data(), std::min(chunk, buf.size() - off) * sizeof(T),
                          cudaMemcpyHostToDevice));
}

struct Ceilings {
  double copy_gbs = 0, gemm_tflops = 0;
};

void report_bw(const Ceilings& c, const char* op, const std::string& shape, double ms, double bytes) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-28s %-30s %9.3f ms %9.1f GB/s     %5.1f%% of copy\n", op, shape.c_str(), ms, gbs,
              100.0 * gbs / c.copy_gbs);
}
void report_flops(const Ceilings& c, const char* op, const std::string& shape, double ms, double flops) {
  const double tf = flops / (ms * 1e-3) / 1e12;
  std::printf("%-28s %-30s %9.3f ms %9.1f TFLOP/s  %5.1f%% of GEMM\n", op, shape.c_str(), ms, tf,
              100.0 * tf / c.gemm_tflops);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount,
              double(prop.totalGlobalMem) / (1 << 30));
  const int reps = quick ? 5 : 20;
  cudaStream_t s = nullptr;
  cuda::MatmulContext mm;
  Ceilings c;

  {  // ceilings
    const size_t bytes = size_t(1) << 30;
    DeviceBuffer<char> a(bytes), b(bytes);
    CUDA_CHECK(cudaMemset(a.get(), 1, bytes));
    const double ms = time_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s)); }, reps);
    c.copy_gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
    const int n = 8192;
    DeviceBuffer<bf16> x(size_t(n) * n), w(size_t(n) * n), y(size_t(n) * n);
    fill_random(x, 1), fill_random(w, 2, 0.01f);
    const double gms = time_ms([&] { cuda::matmul_forward(mm, y.get(), x.get(), w.get(), nullptr, n, n, n, s); }, reps);
    c.gemm_tflops = 2.0 * n * n * double(n) / (gms * 1e-3) / 1e12;
    std::printf("ceiling copy %.1f GB/s\nceiling gemm_bf16_8192 %.1f TFLOP/s\n", c.copy_gbs, c.gemm_tflops);
  }

  const int B = 8, T = 1024, C = 768, V = 50257, Vp = 50304, H = 12, d = 64;
  const int64_t rows = int64_t(B) * T;
  const std::string shape = "B*T=" + std::to_string(rows) + " C=" + std::to_string(C);
  {
    DeviceBuffer<bf16> x(rows * 4 * C), y(rows * 4 * C), z(rows * 4 * C), wte(size_t(Vp) * C), wpe(size_t(T) * C);
    DeviceBuffer<bf16> w(size_t(4) * C * C), wb(size_t(4) * C);
    DeviceBuffer<float> mean(rows), rstd(rows), dw(size_t(Vp) * C), dwc(size_t(4) * C * C), db(size_t(4) * C);
    DeviceBuffer<int32_t> tok(rows), pos(rows);
    fill_random(x, 3), fill_random(y, 4), fill_random(z, 5), fill_random(wte, 6), fill_random(wpe, 7);
    fill_random(w, 8, 0.02f), fill_random(wb, 9);
    std::vector<int32_t> ht(rows), hp(rows);
    Rng rng(10);
    for (int64_t r = 0; r < rows; ++r) ht[r] = rng.below(V), hp[r] = int32_t(r % T);
    tok.upload(ht), pos.upload(hp);
    const size_t escratch_bytes = cuda::embedding_backward_scratch_bytes(rows);
    DeviceBuffer<char> escratch(escratch_bytes), lscratch(cuda::layernorm_backward_scratch_bytes(4 * C));
    const double e2 = 2.0;  // bytes per bf16

    double ms = time_ms([&] { cuda::embedding_forward(x.get(), tok.get(), pos.get(), wte.get(), wpe.get(), rows, C, s); }, reps);
    report_bw(c, "embedding_forward", shape, ms, 3 * e2 * rows * C);
    ms = time_ms([&] { cuda::embedding_backward(dw.get(), nullptr, y.get(), tok.get(), pos.get(), rows, C, V, T, escratch.get(), escratch_bytes, s); }, reps);
    report_bw(c, "embedding_backward(wte)", shape, ms, e2 * rows * C + 2 * 4.0 * rows * C);
    ms = time_ms([&] { cuda::layernorm_forward(y.get(), mean.get(), rstd.get(), x.get(), wb.get(), wb.get(), rows, C, s); }, reps);
    report_bw(c, "layernorm_forward", shape, ms, 2 * e2 * rows * C);
    ms = time_ms([&] { cuda::fused_residual_layernorm_forward(z.get(), y.get(), mean.get(), rstd.get(), x.get(), y.get(), wb.get(), wb.get(), rows, C, s); }, reps);
    report_bw(c, "fused_residual_layernorm", shape, ms, 4 * e2 * rows * C);
    ms = time_ms([&] { cuda::layernorm_backward(z.get(), db.get(), db.get(), y.get(), x.get(), wb.get(), mean.get(), rstd.get(), rows, C, lscratch.get(), s); }, reps);
    report_bw(c, "layernorm_backward", shape, ms, 4 * e2 * rows * C);
    const int64_t n4 = rows * 4 * C;
    ms = time_ms([&] { cuda::gelu_forward(y.get(), x.get(), n4, s); }, reps);
    report_bw(c, "gelu_forward", "n=" + std::to_string(n4), ms, 2 * e2 * n4);
    ms = time_ms([&] { cuda::gelu_backward(z.get(), x.get(), y.get(), n4, s); }, reps);
    report_bw(c, "gelu_backward", "n=" + std::to_string(n4), ms, 4 * e2 * n4);
    ms = time_ms([&] { cuda::residual_forward(z.get(), x.get(), y.get(), rows * C, s); }, reps);
    report_bw(c, "residual_forward", shape, ms, 3 * e2 * rows * C);
    ms = time_ms([&] { cuda::rope_forward(x.get(), pos.get(), rows, H, d, int64_t(3) * H * d, 10000.0f, s); }, reps);
    report_bw(c, "rope_forward (q heads)", shape, ms, 2 * e2 * rows * H * d);
    ms = time_ms([&] { cuda::matmul_forward(mm, y.get(), x.get(), w.get(), wb.get(), rows, C, 3 * C, s); }, reps);
    report_flops(c, "matmul_forward bias", shape + " OC=2304", ms, 2.0 * rows * C * 3 * C);
    ms = time_ms([&] { cuda::matmul_forward(mm, y.get(), x.get(), w.get(), wb.get(), rows, C, 4 * C, s, z.get()); }, reps);
    report_flops(c, "matmul_forward bias+gelu", shape + " OC=3072", ms, 2.0 * rows * C * 4 * C);
    ms = time_ms([&] { cuda::matmul_backward(mm, z.get(), dwc.get(), db.get(), y.get(), x.get(), w.get(), rows, C, 4 * C, s); }, reps);
    report_flops(c, "matmul_backward", shape + " OC=3072", ms, 4.0 * rows * C * 4 * C);
    const std::string ps = "n=" + std::to_string(n4);
    ms = time_ms([&] { cuda::cast_bf16_to_f32(dw.get(), x.get(), std::min<int64_t>(n4, int64_t(Vp) * C), s); }, reps);
    report_bw(c, "cast_bf16_to_f32", ps, ms, 6.0 * std::min<int64_t>(n4, int64_t(Vp) * C));
  }
  {  // cross-entropy over a chunk of 1024 rows
    const int64_t r = 1024;
    DeviceBuffer<bf16> logits(r * Vp);
    DeviceBuffer<float> losses(r);
    DeviceBuffer<int32_t> tgt(std::vector<int32_t>(r, 7));
    fill_random(logits, 11, 4.0f);
    const double ms = time_ms([&] { cuda::crossentropy_forward_backward(losses.get(), logits.get(), tgt.get(), r, V, Vp, 1e-3f, s); }, reps);
    report_bw(c, "crossentropy_fwd_bwd", "rows=1024 Vp=50304", ms, 2 * 2.0 * r * Vp);
  }
  {  // optimizer and norm over a GPT-2-small sized flat buffer
    const int64_t n = 124'000'000;
    DeviceBuffer<float> p(n), g(n), m(n), v(n);
    DeviceBuffer<bf16> pb(n);
    DeviceBuffer<double> out(1), scratch(cuda::kSumSquaresBlocks);
    CUDA_CHECK(cudaMemset(m.get(), 0, n * 4));
    CUDA_CHECK(cudaMemset(v.get(), 0, n * 4));
    fill_random(p, 12), fill_random(g, 13);
    double ms = time_ms([&] { cuda::adamw_update(p.get(), pb.get(), g.get(), m.get(), v.get(), n, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 1, s); }, reps);
    report_bw(c, "adamw_update (fp32 grad)", "n=124M", ms, 30.0 * n);
    ms = time_ms([&] { cuda::sum_squares(out.get(), g.get(), n, scratch.get(), s); }, reps);
    report_bw(c, "sum_squares (fp32)", "n=124M", ms, 4.0 * n);
  }
  {  // Ulysses pack by heads: [B=1, T=8192, 48 heads, 128] to 4 peers
    const int P = 4, Bq = 1, Tq = 8192, Htot = 48, dq = 128;
    std::vector<int32_t> heads(Htot);
    std::vector<int64_t> offs(P + 1);
    for (int i = 0; i < Htot; ++i) heads[i] = (i % P) * (Htot / P) + i / P;  // a non-trivial permutation
    for (int p = 0; p <= P; ++p) offs[p] = int64_t(p) * Htot / P;
    DeviceBuffer<int32_t> dh(heads);
    DeviceBuffer<int64_t> doff(offs);
    const size_t n = size_t(Bq) * Tq * Htot * dq;
    DeviceBuffer<bf16> src(n), dst(n);
    fill_random(src, 14);
    double ms = time_ms([&] { cuda::ulysses_pack_heads(dst.get(), src.get(), DType::bf16, dh.get(), doff.get(), P, Bq, Tq, Htot, dq, 0, Bq, 0, Tq, s); }, reps);
    report_bw(c, "ulysses_pack_heads", "T=8192 H=48 d=128 P=4", ms, 2 * 2.0 * n);
    ms = time_ms([&] { cuda::ulysses_unpack_sequence(dst.get(), src.get(), DType::bf16, P, Bq, Tq / P, Htot, dq, s); }, reps);
    report_bw(c, "ulysses_unpack_sequence", "T=8192 H=48 d=128 P=4", ms, 2 * 2.0 * n);
  }
  {  // attention, causal, d = 128: the flash kernels and cuDNN's fused SDPA on the same inputs
    std::unique_ptr<cuda::CudnnAttention> cudnn;
    std::string cudnn_error;
    try {
      cudnn = std::make_unique<cuda::CudnnAttention>();
    } catch (const std::exception& e) {
      cudnn_error = e.what();
    }
    std::vector<int> lengths = {4096, 16384, 65536};
    if (quick) lengths.pop_back();
    for (int N : lengths) {
      const int Hq = N >= 65536 ? 8 : 16, Hkv = Hq, dh = 128, Ba = 1;
      const size_t n_qkv = size_t(Ba) * N * (Hq + 2 * Hkv) * dh, n_out = size_t(Ba) * N * Hq * dh;
      DeviceBuffer<bf16> qkv(n_qkv), out(n_out), dout(n_out), dqkv(n_qkv);
      DeviceBuffer<float> lse(size_t(Ba) * Hq * N);
      const size_t sb = cuda::attention_backward_scratch_bytes(Ba, N, Hq);
      DeviceBuffer<char> scratch(sb);
      fill_random(qkv, 15), fill_random(dout, 16);
      const int r = N >= 65536 ? 2 : (quick ? 3 : 10);
      const double fwd_ms = time_ms([&] { cuda::attention_forward(out.get(), lse.get(), qkv.get(), Ba, N, Hq, Hkv, dh, s); }, r);
      const double bwd_ms = time_ms([&] { cuda::attention_backward(dqkv.get(), dout.get(), qkv.get(), out.get(), lse.get(), Ba, N, Hq, Hkv, dh, scratch.get(), sb, s); }, r);
      const double fwd_flops = 4.0 * Ba * Hq * double(N) * N * dh / 2;
      const std::string sh = "N=" + std::to_string(N) + " H=" + std::to_string(Hq) + " d=128";
      report_flops(c, "attention_forward", sh, fwd_ms, fwd_flops);
      report_flops(c, "attention_backward", sh, bwd_ms, 2.5 * fwd_flops);
      const double flash_tf = 3.5 * fwd_flops / ((fwd_ms + bwd_ms) * 1e-3) / 1e12;
      // cuDNN SDPA (the first calls build and compile its plans; time_ms's warm-up absorbs them)
      std::string cudnn_part = "  cudnn unavailable: " + cudnn_error;
      if (cudnn) {
        try {
          const double cfwd_ms = time_ms([&] { cudnn->forward(out.get(), lse.get(), qkv.get(), Ba, N, Hq, Hkv, dh, s); }, r);
          const double cbwd_ms = time_ms([&] { cudnn->backward(dqkv.get(), dout.get(), qkv.get(), out.get(), lse.get(), Ba, N, Hq, Hkv, dh, s); }, r);
          report_flops(c, "attention_forward cudnn", sh, cfwd_ms, fwd_flops);
          report_flops(c, "attention_backward cudnn", sh, cbwd_ms, 2.5 * fwd_flops);
          const double cudnn_tf = 3.5 * fwd_flops / ((cfwd_ms + cbwd_ms) * 1e-3) / 1e12;
          char buf[160];
          std::snprintf(buf, sizeof buf, "  cudnn %.1f TFLOP/s  flash/cudnn %.2f (target >= 0.6)", cudnn_tf,
                        flash_tf / cudnn_tf);
          cudnn_part = buf;
        } catch (const std::exception& e) {
          cudnn_part = std::string("  cudnn failed: ") + e.what();
        }
      }
      std::printf("attention fwd+bwd N=%d %.1f TFLOP/s%s\n", N, flash_tf, cudnn_part.c_str());
    }
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
}
