// The whole GPT on the GPU (core/gpt.h with Device::cuda: bf16 compute, fp32 master weights and
// gradients) against the same model on the CPU, the fp32 reference. Small models (2 layers,
// C 128, 2 heads of 64, V 300, N 64, B 2), learned positions and RoPE + GQA (1 kv head):
//   - one forward_backward from the same init_weights: loss within 2e-2 relative; gradients
//     within 5e-2 relative L2 norm of the difference over all parameters, 0.15 per tensor;
//     forward_logits within 2e-2 (max difference over the largest logit);
//   - then 3 plain AdamW steps (the update with param_lowp on cuda, so the bf16 compute copy
//     follows the fp32 master) and a validation loss: every loss within 2e-2 relative, and the
//     compute copy bitwise the bf16 rounding of the master;
//   - a second CUDA run from scratch gives bitwise the same losses and gradients;
//   - recompute selective and full give bitwise the losses and gradients of none; a tiled MLP
//     (another GEMM row count) within 1e-2 of the loss and 2e-2 of the gradients;
//   - recompute full with offloaded checkpoints (runtime.offload, 6 layers: 3 go through pinned
//     host memory) gives bitwise the losses, gradients and logits of full without it, also on an
//     emulated P = 2 rank; the device activations shrink by 3 layer outputs;
//   - an emulated P = 2 sequence-parallel rank (core/emulate.h: the Ulysses pack / unpack ops
//     with the head maps on the device, the exchanges as device copies on the model's stream)
//     against the same emulated rank on the CPU, with the tolerances above;
//   - all_to_all_chunks = 4 on an emulated P = 4 rank: within the tiled MLP's bounds of 1 chunk,
//     bitwise on repeat, the same bytes sent;
//   - the device memory a rank allocates (model + AdamW + one step, cudaMemGetInfo) against the
//     CUDA column of core/memory_estimate.h: the growth from N = 2048 to N = 4096 within 5% of
//     the estimate's (the fixed cuBLASLt workspace and handles cancel in the difference).
// Why these bounds: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.002) and every
// activation and activation gradient is stored in bf16; through two layers and the LM head that
// is about 1e-3..1e-2 on the loss and the gradients. A wrong op (a missing term, a transposed
// weight, a wrong head) is off by O(1).
// Inputs are random tokens, targets (two ignored) and positions, never all zero. Without a CUDA
// device the executable prints "SKIPPED: no CUDA device" and exits 77 (CTest: skipped).
#include <catch2/catch.hpp>
#include <cuda_runtime.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "core/emulate.h"
#include "core/gpt.h"
#include "core/memory_estimate.h"
#include "core/optimizer.h"
#include "kernels/cuda/cuda_check.h"
#include "tests/test_util.h"
#include "tests/cuda/cuda_test_case.h"

namespace {

using namespace ulysses;
using ulysses::cuda::test::skip_without_cuda;

constexpr double kLossTol = 2e-2;      // relative, loss (mean over valid targets)
constexpr double kGradTol = 5e-2;      // relative L2 norm of the difference, all parameters
constexpr double kTensorTol = 0.15;    // the same, per parameter tensor
constexpr double kLogitsTol = 2e-2;    // max |diff| / max |cpu| over one logits row

ModelConfig small_model(bool rope) {
  ModelConfig m;
  m.n_layer = 2;
  m.n_embd = 128;
  m.n_head = 2;          // head_dim 64
  m.n_kv_head = rope ? 1 : 0;  // RoPE runs with GQA (2 query heads share 1 kv head)
  m.vocab_size = 300;    // padded to 384: the padding must stay inert
  m.max_seq_len = 64;
  m.position_embedding = rope ? "rope" : "learned";
  return m;
}

struct Batch {
  std::vector<int32_t> tokens, targets, positions;  // [B, T]
};

// rank 0's slice of a P-way split: positions 0..T-1 of each sequence
Batch random_batch(int B, int T, int V, uint32_t seed) {
  std::mt19937 rng(seed);
  Batch b;
  for (int i = 0; i < B; ++i)
    for (int t = 0; t < T; ++t) {
      b.tokens.push_back(int32_t(rng() % uint32_t(V)));
      b.targets.push_back(int32_t(rng() % uint32_t(V)));
      b.positions.push_back(t);
    }
  b.targets[5] = -1;  // ignored targets
  b.targets[size_t(T) + 7] = -1;
  return b;
}

// Device (or host) tensor -> host fp32, through ops::copy on the model's context.
std::vector<float> download_f32(GPT& model, Tensor t) {
  std::vector<float> h(size_t(t.numel()));
  ops::copy(model.context(), Tensor(h.data(), {t.numel()}, DType::f32, Device::cpu), t);
  ops::synchronize(model.context());
  return h;
}

std::vector<float> download_bf16(GPT& model, Tensor t) {
  std::vector<uint16_t> bits(size_t(t.numel()));
  ops::copy(model.context(), Tensor(bits.data(), {t.numel()}, DType::bf16, Device::cpu), t);
  ops::synchronize(model.context());
  std::vector<float> h(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    const uint32_t u = uint32_t(bits[i]) << 16;
    std::memcpy(&h[i], &u, 4);
  }
  return h;
}

float round_to_bf16(float x) {  // round to nearest even, as the cast kernel (finite x)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// sqrt(sum (a - b)^2 / sum b^2) over [begin, end)
double rel_l2(const std::vector<float>& a, const std::vector<float>& b, size_t begin, size_t end) {
  double diff = 0, ref = 0;
  for (size_t i = begin; i < end; ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    ref += double(b[i]) * b[i];
  }
  return ref > 0 ? std::sqrt(diff / ref) : (diff == 0 ? 0 : INFINITY);
}

// One AdamW update of every parameter tensor (weight decay on matrices and embeddings only, as
// core/optimizer.cpp), with the optimizer's m and v; on cuda the update also writes the bf16
// compute copy (param_lowp), which is what the trainer does.
void adamw_step(GPT& model, AdamW& opt, const TrainConfig& t, float lr, float grad_scale, int step) {
  const Tensor master = model.params_flat(), grads = model.grads_flat(), compute = model.compute_params_padded();
  const bool lowp = model.device() == Device::cuda;
  int64_t off = 0;
  for (const ParameterSpec& s : parameter_specs(model.shape())) {
    const int64_t n = s.numel();
    if (n > 0)
      ops::adamw_update(model.context(), master.rows(off, n), grads.rows(off, n), opt.m().rows(off, n),
                        opt.v().rows(off, n), lr, float(t.beta1), float(t.beta2), float(t.eps),
                        s.weight_decay ? float(t.weight_decay) : 0.f, grad_scale, step,
                        lowp ? compute.rows(off, n) : Tensor());
    off += n;
  }
}

struct Run {
  std::vector<double> losses;  // mean loss of each step's micro-batch, then the validation loss
  std::vector<float> grads;    // after the first forward_backward (fp32, all parameters)
  std::vector<float> logits;   // forward_logits of one row after the updates
  bool compute_is_rounded_master = true;  // cuda: compute copy == bf16(master), bitwise
};

constexpr int kSteps = 3;

// init_weights(7), then kSteps of (zero_grad, forward_backward, AdamW), then a validation loss
// and one row of logits, on `device`. seq: an emulated sequence communicator when run.P > 1.
Run train(const ModelConfig& m, GPTRunShape run, Device device, Communicator* seq = nullptr) {
  GPT model(m, run, device, seq);
  model.init_weights(7);
  TrainConfig t;
  AdamW opt(t, model.shape(), device);
  // AdamW's arena was zeroed by cudaMemset on the legacy default stream, which the model's
  // non-blocking stream does not wait for
  if (device == Device::cuda) CUDA_CHECK(cudaDeviceSynchronize());
  const int T = run.T();
  Run r;
  for (int step = 0; step < kSteps; ++step) {
    const Batch b = random_batch(run.B, T, m.vocab_size, 100 + uint32_t(step));
    model.zero_grad();
    int64_t count = 0;
    const double sum = model.forward_backward(b.tokens.data(), b.targets.data(), b.positions.data(), &count);
    r.losses.push_back(sum / double(count));
    if (step == 0) r.grads = download_f32(model, model.grads_flat());
    adamw_step(model, opt, t, 1e-3f, 1.f / float(count), step + 1);
  }
  const Batch val = random_batch(run.B, T, m.vocab_size, 999);
  int64_t count = 0;
  r.losses.push_back(model.forward_loss(val.tokens.data(), val.targets.data(), val.positions.data(), &count) /
                     double(count));
  r.logits.resize(size_t(model.shape().Vp));
  model.forward_logits(val.tokens.data(), val.positions.data(), int64_t(T) + 3, r.logits.data());
  if (device == Device::cuda) {
    const std::vector<float> master = download_f32(model, model.params_padded());
    const std::vector<float> compute = download_bf16(model, model.compute_params_padded());
    for (size_t i = 0; i < master.size() && r.compute_is_rounded_master; ++i)
      r.compute_is_rounded_master = round_to_bf16(master[i]) == compute[i];
  }
  return r;
}

// The checks of cuda against cpu (the tolerances at the top).
void compare(const ModelConfig& m, const Run& cuda, const Run& cpu) {
  REQUIRE(cuda.losses.size() == cpu.losses.size());
  for (size_t i = 0; i < cpu.losses.size(); ++i) {
    const double rel = std::abs(cuda.losses[i] - cpu.losses[i]) / std::abs(cpu.losses[i]);
    std::printf("  loss %zu: cpu %.6f cuda %.6f  rel %.2e\n", i, cpu.losses[i], cuda.losses[i], rel);
    CHECK(rel <= kLossTol);
  }
  REQUIRE(cuda.grads.size() == cpu.grads.size());
  const double all = rel_l2(cuda.grads, cpu.grads, 0, cpu.grads.size());
  std::printf("  gradients: relative L2 difference %.2e (all parameters)\n", all);
  CHECK(all <= kGradTol);
  size_t off = 0;
  for (const ParameterSpec& s : parameter_specs(GPTShape::from(m))) {
    const size_t n = size_t(s.numel());
    if (n == 0) continue;
    const double rel = rel_l2(cuda.grads, cpu.grads, off, off + n);
    std::printf("    %-9s %.2e\n", s.name.c_str(), rel);
    INFO("parameter tensor " << s.name);
    CHECK(rel <= kTensorTol);
    off += n;
  }
  const double logits = test::max_rel_diff(cuda.logits, cpu.logits);
  std::printf("  logits row: max difference / max |cpu| %.2e\n", logits);
  CHECK(logits <= kLogitsTol);
  CHECK(cuda.compute_is_rounded_master);
}

bool bitwise_equal(const Run& a, const Run& b) {
  return a.losses == b.losses && a.grads.size() == b.grads.size() &&
         std::memcmp(a.grads.data(), b.grads.data(), a.grads.size() * 4) == 0 && a.logits == b.logits;
}

}  // namespace

TEST_CASE("GPT on CUDA matches the CPU reference: loss, gradients, AdamW steps, logits", "[cuda][model]") {
  skip_without_cuda();
  for (bool rope : {false, true}) {
    DYNAMIC_SECTION((rope ? "RoPE + GQA" : "learned positions")) {
      std::printf("%s\n", rope ? "RoPE + GQA" : "learned positions");
      const ModelConfig m = small_model(rope);
      const GPTRunShape run{2, 64, 1, 0, Recompute::none};
      compare(m, train(m, run, Device::cuda), train(m, run, Device::cpu));
    }
  }
}

TEST_CASE("GPT on CUDA is deterministic: a second run from scratch is bitwise the first", "[cuda][model]") {
  skip_without_cuda();
  const ModelConfig m = small_model(true);
  const GPTRunShape run{2, 64, 1, 0, Recompute::none};
  const Run a = train(m, run, Device::cuda), b = train(m, run, Device::cuda);
  CHECK(bitwise_equal(a, b));
}

TEST_CASE("recompute selective / full on CUDA: bitwise the losses and gradients of none", "[cuda][model]") {
  skip_without_cuda();
  for (bool rope : {false, true}) {
    DYNAMIC_SECTION((rope ? "RoPE + GQA" : "learned positions")) {
      const ModelConfig m = small_model(rope);
      const GPTRunShape none{2, 64, 1, 0, Recompute::none};
      GPTRunShape selective = none, full = none;
      selective.recompute = Recompute::selective;
      full.recompute = Recompute::full;
      const Run base = train(m, none, Device::cuda);
      CHECK(bitwise_equal(train(m, selective, Device::cuda), base));
      CHECK(bitwise_equal(train(m, full, Device::cuda), base));
      // a tiled MLP runs its GEMMs on 48-row chunks (the last one 32): other kernels, other
      // rounding, the same maths
      GPTRunShape tiled = none;
      tiled.tile_tokens = 48;
      const Run t = train(m, tiled, Device::cuda);
      const double loss_rel = std::abs(t.losses[0] - base.losses[0]) / std::abs(base.losses[0]);
      const double grad_rel = rel_l2(t.grads, base.grads, 0, base.grads.size());
      std::printf("tiled MLP (%s): loss rel %.2e, gradients rel L2 %.2e\n", rope ? "rope" : "learned", loss_rel,
                  grad_rel);
      CHECK(loss_rel <= 1e-2);
      CHECK(grad_rel <= 2e-2);
    }
  }
}

TEST_CASE("an emulated P = 2 sequence-parallel rank on CUDA matches the same rank on the CPU", "[cuda][model][sp]") {
  skip_without_cuda();
  for (bool rope : {false, true}) {  // rope: 1 kv head for 2 ranks, sent to both and summed back
    DYNAMIC_SECTION((rope ? "RoPE + GQA" : "learned positions")) {
      std::printf("emulated P = 2, %s\n", rope ? "RoPE + GQA" : "learned positions");
      const ModelConfig m = small_model(rope);
      const GPTRunShape run{2, 64, 2, 0, Recompute::none};
      EmulatedSequenceCommunicator seq_cuda(2, 0, Device::cuda), seq_cpu(2, 0);
      const Run cuda = train(m, run, Device::cuda, &seq_cuda);
      const Run cpu = train(m, run, Device::cpu, &seq_cpu);
      compare(m, cuda, cpu);
      // the emulated exchanges moved what a real rank sends, in bf16 on cuda and fp32 on cpu
      CHECK(2 * seq_cuda.counters().bytes_sent[size_t(Collective::all_to_all)] ==
            seq_cpu.counters().bytes_sent[size_t(Collective::all_to_all)]);
    }
  }
}

// runtime.all_to_all_chunks = 4 on an emulated P = 4 rank (comm/ulysses.h: the chunks' device
// copies on the all-to-all's comm stream, ordered by events): within the tiled MLP's bounds of
// 1 chunk (the qkv and attproj GEMMs run on 16-row chunks: other cuBLASLt kernels, other
// rounding), bitwise on repeat, the same bytes in 8 times the calls. 4 heads (GQA: 2 kv), so every
// peer takes as many heads as this rank and the emulated copies move the same elements either way.
TEST_CASE("all_to_all_chunks = 4 on an emulated P = 4 rank: the losses of 1 chunk, bitwise on repeat",
          "[cuda][model][sp]") {
  skip_without_cuda();
  for (bool rope : {false, true}) {
    DYNAMIC_SECTION((rope ? "RoPE + GQA" : "learned positions")) {
      ModelConfig m = small_model(rope);
      m.n_embd = 256;
      m.n_head = 4;  // head_dim 64
      m.n_kv_head = rope ? 2 : 0;
      const GPTRunShape whole{2, 64, 4, 0, Recompute::none};
      GPTRunShape chunked = whole;
      chunked.all_to_all_chunks = 4;
      EmulatedSequenceCommunicator s1(4, 0, Device::cuda), s4(4, 0, Device::cuda), s4_again(4, 0, Device::cuda);
      const Run one = train(m, whole, Device::cuda, &s1);
      const Run four = train(m, chunked, Device::cuda, &s4);
      const Run again = train(m, chunked, Device::cuda, &s4_again);
      double loss_rel = 0;
      for (size_t i = 0; i < one.losses.size(); ++i)
        loss_rel = std::max(loss_rel, std::abs(four.losses[i] - one.losses[i]) / std::abs(one.losses[i]));
      const double grad_rel = rel_l2(four.grads, one.grads, 0, one.grads.size());
      std::printf("all_to_all_chunks 4 vs 1 (emulated P = 4, %s): loss rel %.2e, gradients rel L2 %.2e\n",
                  rope ? "rope" : "learned", loss_rel, grad_rel);
      CHECK(loss_rel <= 1e-2);
      CHECK(grad_rel <= 2e-2);
      CHECK(bitwise_equal(four, again));
      const size_t a2a = size_t(Collective::all_to_all);
      CHECK(s4.counters().bytes_sent[a2a] == s1.counters().bytes_sent[a2a]);
      CHECK(s4.counters().calls[a2a] == 8 * s1.counters().calls[a2a]);  // B * K = 2 * 4
    }
  }
}

namespace {

// Device memory in use after building a model and AdamW for `cfg` at sequence length N and
// running one step, less what was in use before (bytes).
double device_bytes_for_one_step(const Config& cfg, int N) {
  size_t free_before = 0, free_after = 0, total = 0;
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemGetInfo(&free_before, &total));
  {
    GPT model(cfg.model, {cfg.train.micro_batch_size, N, 1, cfg.runtime.tile_tokens, Recompute::none}, Device::cuda,
              nullptr);
    model.init_weights(3);
    AdamW opt(cfg.train, model.shape(), Device::cuda);
    CUDA_CHECK(cudaDeviceSynchronize());  // AdamW's cudaMemset (legacy stream)
    const Batch b = random_batch(cfg.train.micro_batch_size, N, cfg.model.vocab_size, 5);
    int64_t count = 0;
    model.zero_grad();
    model.forward_backward(b.tokens.data(), b.targets.data(), b.positions.data(), &count);
    adamw_step(model, opt, cfg.train, 1e-4f, 1.f / float(count), 1);
    ops::synchronize(model.context());
    CUDA_CHECK(cudaMemGetInfo(&free_after, &total));
  }
  return double(free_before) - double(free_after);
}

}  // namespace

TEST_CASE("device memory of a CUDA rank follows the CUDA column of the memory estimate", "[cuda][model][memory]") {
  skip_without_cuda();
  Config cfg;
  cfg.model.n_layer = 4;
  cfg.model.n_embd = 512;
  cfg.model.n_head = 8;
  cfg.model.vocab_size = 8192;
  cfg.model.max_seq_len = 4096;
  cfg.model.position_embedding = "rope";
  cfg.train.micro_batch_size = 2;
  auto estimated = [&](int N) {
    const MemoryEstimate e = estimate_memory(cfg, 1, 1, N, Recompute::none, 0, MemoryLayout::cuda_bf16);
    return e.total() - e.items.back().bytes;  // less the fixed runtime item
  };
  const double m2k = device_bytes_for_one_step(cfg, 2048), m4k = device_bytes_for_one_step(cfg, 4096);
  const double e2k = estimated(2048), e4k = estimated(4096);
  std::printf("device memory, N 2048: estimated %.1f MiB, allocated %.1f MiB; N 4096: estimated %.1f MiB, "
              "allocated %.1f MiB\n",
              e2k / 1048576, m2k / 1048576, e4k / 1048576, m4k / 1048576);
  const double rel = ((m4k - m2k) - (e4k - e2k)) / (e4k - e2k);
  std::printf("growth 2048 -> 4096: estimated %.1f MiB, allocated %.1f MiB (%+.1f%%)\n", (e4k - e2k) / 1048576,
              (m4k - m2k) / 1048576, 100 * rel);
  CHECK(std::abs(rel) < 0.05);
}

TEST_CASE("offloaded checkpoints (recompute full): bitwise the losses and gradients of full", "[cuda][model][offload]") {
  skip_without_cuda();
  // 6 layers: layers 0..2 go to pinned host memory and back (3 device slots), 3..5 stay in
  // their slots; every slot is reused in forward and refilled in backward
  for (bool rope : {false, true}) {
    DYNAMIC_SECTION((rope ? "RoPE + GQA" : "learned positions")) {
      ModelConfig m = small_model(rope);
      m.n_layer = 6;
      const GPTRunShape full{2, 64, 1, 0, Recompute::full};
      GPTRunShape offload = full;
      offload.offload_checkpoints = true;
      {
        GPT a(m, full, Device::cuda, nullptr), b(m, offload, Device::cuda, nullptr);
        const size_t layer = size_t(full.rows()) * size_t(m.n_embd) * 2;  // [B*T, C] bf16, a multiple of 256
        std::printf("offload (%s): activations %zu -> %zu bytes, pinned host %zu bytes\n", rope ? "rope" : "learned",
                    a.activation_bytes(), b.activation_bytes(), b.offloaded_checkpoint_bytes());
        CHECK(a.activation_bytes() - b.activation_bytes() == 3 * layer);  // 6 per-layer outputs -> 3 slots
        CHECK(b.offloaded_checkpoint_bytes() == 3 * layer);
        CHECK(a.offloaded_checkpoint_bytes() == 0);
      }
      const Run base = train(m, full, Device::cuda);
      const Run off = train(m, offload, Device::cuda);
      for (size_t i = 0; i < base.losses.size(); ++i)
        std::printf("  loss %zu: full %.7f  full + offload %.7f\n", i, base.losses[i], off.losses[i]);
      CHECK(bitwise_equal(off, base));
      CHECK(off.compute_is_rounded_master);
    }
  }
  // under emulated sequence parallelism (the all-to-alls on the model's stream between the copies)
  ModelConfig m = small_model(true);
  m.n_layer = 5;
  GPTRunShape full{2, 64, 2, 0, Recompute::full}, offload = full;
  offload.offload_checkpoints = true;
  EmulatedSequenceCommunicator seq_a(2, 0, Device::cuda), seq_b(2, 0, Device::cuda);
  CHECK(bitwise_equal(train(m, offload, Device::cuda, &seq_b), train(m, full, Device::cuda, &seq_a)));
}
