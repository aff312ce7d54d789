// cuDNN SDPA attention (runtime.attention = cudnn, kernels/cuda/attention_cudnn.h) against the
// fp32 CPU reference (cpu::attention_forward / attention_backward) and against the handwritten
// flash kernels (cuda::attention_forward / attention_backward), on random bf16 inputs that are
// never zero: head dims 64 and 128, GQA (Hq=8, Hkv=2), MQA and MHA, sequence lengths that are not
// multiples of any tile (97, 130, 200). Outputs are NaN-poisoned before each call, so an element
// cuDNN does not write fails; NaN never passes. Error = max |got - ref| / max |ref| per output.
// Bounds (the flash kernels' bounds in test_cuda_ops.cpp):
//   out   1e-2  bf16 output (one rounding: 2^-8 relative) of fp32-accumulated bf16 products
//   lse   1e-3  fp32 statistics; a wrong scale, mask or layout gives errors of order 1
//   dqkv  2e-2  the backward's matmuls take P and dS rounded to bf16 (as the flash kernels do)
// cuDNN against flash: twice those bounds (each is within its bound of the reference).
// One CudnnAttention serves every case, so its plan cache sees several shapes; the first shape is
// run again at the end from its cached plan and must give the same forward bits.
// Without a CUDA device the executable prints "SKIPPED: no CUDA device" and exits with 77.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/base/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_case.h"
#include "tests/cuda/cuda_test_util.h"

namespace {

using namespace ulysses;
using namespace ulysses::cuda::test;
using cuda::bf16;
using Vec = std::vector<float>;


struct Case {
  int B, N, Hq, Hkv, d;
  std::string name() const {
    return "B=" + std::to_string(B) + " N=" + std::to_string(N) + " Hq=" + std::to_string(Hq) +
           " Hkv=" + std::to_string(Hkv) + " d=" + std::to_string(d);
  }
};

std::vector<Result> attention_case(cuda::CudnnAttention& cudnn, const Case& c, uint64_t seed) {
  const int B = c.B, N = c.N, Hq = c.Hq, Hkv = c.Hkv, d = c.d, Htot = Hq + 2 * Hkv;
  Rng rng(seed);
  const size_t n_qkv = size_t(B) * N * Htot * d, n_out = size_t(B) * N * Hq * d, n_lse = size_t(B) * Hq * N;
  const Vec qkv = rounded_bf16(random_vector(rng, n_qkv, 2.0f));
  const Vec dout = rounded_bf16(random_vector(rng, n_out));

  // CPU reference; the backward consumes the bf16-rounded out, as the device backward does
  Vec out_ref(n_out), lse_ref(n_lse), dqkv_ref(n_qkv);
  cpu::attention_forward(out_ref.data(), lse_ref.data(), qkv.data(), B, N, Hq, Hkv, d);
  const Vec out_bf = rounded_bf16(out_ref);
  cpu::attention_backward(dqkv_ref.data(), dout.data(), qkv.data(), out_bf.data(), lse_ref.data(), B, N, Hq, Hkv, d);

  DeviceBuffer<bf16> d_qkv(qkv), d_dout(dout), d_out_bf(out_bf), d_out(n_out), d_dqkv(n_qkv);
  DeviceBuffer<float> d_lse(n_lse), d_lse_ref(lse_ref);
  std::vector<Result> res;

  // cuDNN forward
  d_out.poison(), d_lse.poison();
  cudnn.forward(d_out.get(), d_lse.get(), d_qkv.get(), B, N, Hq, Hkv, d, nullptr);
  const Vec out_cudnn = d_out.download(), lse_cudnn = d_lse.download();
  res.push_back({"out", normalised_error(out_cudnn, out_ref), 1e-2});
  res.push_back({"lse", normalised_error(lse_cudnn, lse_ref), 1e-3});

  // cuDNN backward from the reference out and lse, then from its own forward's
  d_dqkv.poison();
  cudnn.backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out_bf.get(), d_lse_ref.get(), B, N, Hq, Hkv, d, nullptr);
  const Vec dqkv_cudnn = d_dqkv.download();
  res.push_back({"dqkv", normalised_error(dqkv_cudnn, dqkv_ref), 2e-2});
  d_dqkv.poison();
  cudnn.backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(), B, N, Hq, Hkv, d, nullptr);
  res.push_back({"dqkv (own forward)", normalised_error(d_dqkv.download(), dqkv_ref), 2e-2});

  // the flash kernels on the same inputs
  DeviceBuffer<bf16> f_out(n_out), f_dqkv(n_qkv);
  DeviceBuffer<float> f_lse(n_lse);
  const size_t scratch_bytes = cuda::attention_backward_scratch_bytes(B, N, Hq);
  DeviceBuffer<char> scratch(scratch_bytes);
  f_out.poison(), f_lse.poison(), f_dqkv.poison();
  cuda::attention_forward(f_out.get(), f_lse.get(), d_qkv.get(), B, N, Hq, Hkv, d, nullptr);
  cuda::attention_backward(f_dqkv.get(), d_dout.get(), d_qkv.get(), d_out_bf.get(), d_lse_ref.get(), B, N, Hq, Hkv, d,
                           scratch.get(), scratch_bytes, nullptr);
  res.push_back({"out vs flash", normalised_error(out_cudnn, f_out.download()), 2e-2});
  res.push_back({"lse vs flash", normalised_error(lse_cudnn, f_lse.download()), 2e-3});
  res.push_back({"dqkv vs flash", normalised_error(dqkv_cudnn, f_dqkv.download()), 4e-2});
  return res;
}

// The forward of a shape whose plan is already cached: the same bits as a fresh run.
std::vector<Result> cached_plan_case(cuda::CudnnAttention& cudnn, const Case& c, uint64_t seed) {
  Rng rng(seed);
  const size_t n_qkv = size_t(c.B) * c.N * (c.Hq + 2 * c.Hkv) * c.d, n_out = size_t(c.B) * c.N * c.Hq * c.d;
  DeviceBuffer<bf16> d_qkv(rounded_bf16(random_vector(rng, n_qkv, 2.0f))), d_out(n_out);
  DeviceBuffer<float> d_lse(size_t(c.B) * c.Hq * c.N);
  d_out.poison();
  cudnn.forward(d_out.get(), d_lse.get(), d_qkv.get(), c.B, c.N, c.Hq, c.Hkv, c.d, nullptr);
  const auto first = d_out.raw();
  d_out.poison();
  cudnn.forward(d_out.get(), d_lse.get(), d_qkv.get(), c.B, c.N, c.Hq, c.Hkv, c.d, nullptr);
  const auto second = d_out.raw();
  const bool same = std::memcmp(first.data(), second.data(), first.size() * sizeof(bf16)) == 0;
  return {{"forward bitwise repeat", same ? 0.0 : 1.0, 0.0}};
}

bool report(const std::string& name, const std::vector<Result>& results) {
  bool all_ok = true;
  for (const Result& r : results) {
    const bool ok = r.err <= r.tol;  // NaN and inf compare false
    all_ok = all_ok && ok;
    std::printf("%s  %-36s %-22s err %.3e  tol %.0e\n", ok ? "ok  " : "FAIL", name.c_str(), r.output.c_str(), r.err,
                r.tol);
    INFO(name << ": " << r.output << " err " << r.err << " tol " << r.tol);
    CHECK(ok);
  }
  return all_ok;
}

}  // namespace

TEST_CASE("cuDNN SDPA matches the CPU reference and the flash kernels", "[cuda][cudnn]") {
  skip_without_cuda();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  cuda::CudnnAttention cudnn;
  std::printf("cuDNN %zu (loaded at run time)\n", cudnn.version());
  const std::vector<Case> cases = {
      {2, 200, 8, 2, 64},   // GQA, N not a multiple of 64
      {1, 200, 8, 2, 128},  // GQA, d = 128
      {1, 256, 4, 4, 128},  // MHA
      {2, 130, 4, 4, 64},   // MHA, odd N
      {1, 97, 8, 1, 64},    // MQA, N below one 128-row tile
      {1, 1024, 2, 1, 128}, // several tiles in each direction
  };
  int failures = 0;
  uint64_t seed = 100;
  for (const Case& c : cases) {
    if (c.N % 128 != 0 && cudnn.version() < 91600) {
      // the refusal itself is checked in the next test case; the numbers need cuDNN 9.16
      std::printf("SKIP  %-36s cuDNN %zu has no SDPA backward for N %% 128 != 0 (9.16 has)\n", c.name().c_str(),
                  cudnn.version());
      ++seed;
      continue;
    }
    try {
      failures += !report(c.name(), attention_case(cudnn, c, seed++));
    } catch (const std::exception& e) {
      std::printf("FAIL  %-36s threw: %s\n", c.name().c_str(), e.what());
      ++failures;
      CHECK(std::string(e.what()).empty());
    }
  }
  try {
    failures += !report(cases[0].name() + " (cached)", cached_plan_case(cudnn, cases[0], seed++));
  } catch (const std::exception& e) {
    std::printf("FAIL  cached plan threw: %s\n", e.what());
    ++failures;
    CHECK(std::string(e.what()).empty());
  }
  std::printf("%d case(s) failed\n", failures);
}

TEST_CASE("cuDNN SDPA refuses unsupported shapes with a UserError naming them", "[cuda][cudnn]") {
  skip_without_cuda();
  cuda::CudnnAttention cudnn;
  DeviceBuffer<bf16> buf(size_t(1) << 16);
  DeviceBuffer<float> lse(1024);
  const auto message = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  // head dimension not a multiple of 8
  std::string what = message([&] { cudnn.forward(buf.get(), lse.get(), buf.get(), 1, 16, 2, 2, 100, nullptr); });
  CHECK(what.find("runtime.attention") != std::string::npos);
  CHECK(what.find("d=100") != std::string::npos);
  // Hq not a multiple of Hkv
  what = message([&] { cudnn.forward(buf.get(), lse.get(), buf.get(), 1, 16, 3, 2, 64, nullptr); });
  CHECK(what.find("Hq=3 Hkv=2") != std::string::npos);
  // a single query and key: no cuDNN backward
  what = message([&] {
    cudnn.backward(buf.get(), buf.get(), buf.get(), buf.get(), lse.get(), 1, 1, 2, 2, 64, nullptr);
  });
  CHECK(what.find("N=1") != std::string::npos);
  // before 9.16: an N that is not a multiple of 128 has no backward, refused by name
  if (cudnn.version() < 91600) {
    what = message([&] {
      cudnn.backward(buf.get(), buf.get(), buf.get(), buf.get(), lse.get(), 1, 200, 2, 2, 64, nullptr);
    });
    CHECK(what.find("9.16") != std::string::npos);
  }
}
