// Whole-model tests on the CPU backend: the gradient of the full GPT against finite differences
// (learned positions, RoPE, GQA), overfitting a fixed batch, AdamW + schedule basics, and the
// shape checks of the CUDA path (which need no GPU).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/base/error.h"
#include "core/gpt.h"
#include "core/optimizer.h"

using namespace ulysses;

namespace {

ModelConfig tiny_model(const std::string& positions, int heads, int kv_heads) {
  ModelConfig m;
  m.n_layer = 2;
  m.n_embd = 32;
  m.n_head = heads;
  m.n_kv_head = kv_heads;
  m.vocab_size = 61;  // padded to 128: the padding must stay inert
  m.max_seq_len = 32;
  m.position_embedding = positions;
  return m;
}

struct Batch {
  std::vector<int32_t> tokens, targets, positions;
};

Batch random_batch(int B, int N, int V, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  Batch b;
  for (int i = 0; i < B; ++i)
    for (int t = 0; t < N; ++t) {
      b.tokens.push_back(int32_t(rng() % uint32_t(V)));
      b.targets.push_back(int32_t(rng() % uint32_t(V)));
      b.positions.push_back(t);
    }
  b.targets[3] = -1;  // an ignored target
  return b;
}

double mean_loss(GPT& model, const Batch& b) {
  int64_t count = 0;
  const double sum = model.forward_loss(b.tokens.data(), b.targets.data(), b.positions.data(), &count);
  return sum / double(count);
}

}  // namespace

TEST_CASE("whole-model gradient matches finite differences", "[model]") {
  struct Case {
    const char* positions;
    int heads, kv_heads, N;
  };
  for (Case c : {Case{"learned", 4, 4, 13}, Case{"rope", 4, 2, 9}, Case{"rope", 2, 1, 16}}) {
    DYNAMIC_SECTION(c.positions << " Hq=" << c.heads << " Hkv=" << c.kv_heads << " N=" << c.N) {
      const ModelConfig cfg = tiny_model(c.positions, c.heads, c.kv_heads);
      const int B = 2;
      GPT model(cfg, {B, c.N, 1, 5 /* LM head in chunks of 5 rows */}, Device::cpu, nullptr);
      model.init_weights(42);
      // larger-than-init weights so every path carries signal
      float* p = model.params_flat().f32();
      const int64_t n = model.params_flat().numel();
      std::mt19937 rng(7);
      std::normal_distribution<float> noise(0.f, 0.05f);
      for (int64_t i = 0; i < n; ++i) p[i] += noise(rng);
      const Batch batch = random_batch(B, c.N, cfg.vocab_size, 3);

      model.zero_grad();
      int64_t count = 0;
      model.forward_backward(batch.tokens.data(), batch.targets.data(), batch.positions.data(), &count);
      REQUIRE(count == B * c.N - 1);
      std::vector<float> grad(model.grads_flat().f32(), model.grads_flat().f32() + n);
      for (float& g : grad) g /= float(count);  // gradient of the mean loss

      // directional derivatives along random directions: (L(p + e u) - L(p - e u)) / 2e == g . u
      std::vector<float> saved(p, p + n);
      for (int dir = 0; dir < 3; ++dir) {
        std::vector<float> u(static_cast<size_t>(n));
        double gu = 0;
        for (int64_t i = 0; i < n; ++i) {
          u[size_t(i)] = noise(rng);
          gu += double(grad[size_t(i)]) * u[size_t(i)];
        }
        const float eps = 1e-2f;
        for (int64_t i = 0; i < n; ++i) p[i] = saved[size_t(i)] + eps * u[size_t(i)];
        const double up = mean_loss(model, batch);
        for (int64_t i = 0; i < n; ++i) p[i] = saved[size_t(i)] - eps * u[size_t(i)];
        const double down = mean_loss(model, batch);
        std::copy(saved.begin(), saved.end(), p);
        const double fd = (up - down) / (2 * eps);
        INFO("direction " << dir << ": finite difference " << fd << ", analytic " << gu);
        REQUIRE(std::abs(gu) > 1e-3);
        CHECK(std::abs(fd - gu) <= 2e-2 * std::abs(gu) + 1e-4);
      }
      // the padded vocabulary rows get no gradient
      const Tensor wte = model.grads().wte();
      for (int64_t v = cfg.vocab_size; v < cfg.padded_vocab_size(); ++v)
        for (int k = 0; k < cfg.n_embd; ++k) REQUIRE(wte.f32()[v * cfg.n_embd + k] == 0.f);
    }
  }
}

TEST_CASE("a tiny model overfits a fixed batch", "[model]") {
  ModelConfig cfg = tiny_model("learned", 4, 4);
  const int B = 2, N = 16;
  GPT model(cfg, {B, N, 1, 0}, Device::cpu, nullptr);
  model.init_weights(1);
  TrainConfig t;
  t.lr = 3e-3;
  t.weight_decay = 0.0;
  t.warmup_steps = 0;
  t.lr_schedule = "constant";
  AdamW opt(t, model.shape(), Device::cpu);
  Batch batch = random_batch(B, N, cfg.vocab_size, 11);
  batch.targets[3] = 5;
  double first = 0, loss = 0;
  for (int step = 0; step < 300; ++step) {
    model.zero_grad();
    int64_t count = 0;
    loss = model.forward_backward(batch.tokens.data(), batch.targets.data(), batch.positions.data(), &count) /
           double(count);
    if (step == 0) first = loss;
    opt.update(model.context(), model.params_flat(), model.grads_flat(), float(t.lr), 1.f / float(count), step + 1);
  }
  INFO("first loss " << first << ", last " << loss);
  CHECK(first > 3.5);
  CHECK(loss < 0.1);
}

TEST_CASE("learning-rate schedules", "[optimizer]") {
  TrainConfig t;
  t.lr = 1.0;
  t.min_lr_ratio = 0.1;
  t.warmup_steps = 10;
  t.max_steps = 110;
  t.lr_schedule = "cosine";
  CHECK(learning_rate(t, 0) == Approx(0.1));
  CHECK(learning_rate(t, 9) == Approx(1.0));
  CHECK(learning_rate(t, 60) == Approx(0.55));  // halfway through the cosine
  CHECK(learning_rate(t, 110) == Approx(0.1));
  t.lr_schedule = "linear";
  CHECK(learning_rate(t, 60) == Approx(0.55));
  CHECK(learning_rate(t, 35) == Approx(0.775));
  t.lr_schedule = "constant";
  CHECK(learning_rate(t, 100) == Approx(1.0));
}

TEST_CASE("parameter layout follows llm.c", "[model]") {
  ModelConfig m;
  m.n_layer = 12;
  m.n_embd = 768;
  m.n_head = 12;
  m.vocab_size = 50257;
  m.max_seq_len = 1024;
  const GPTShape s = GPTShape::from(m);
  CHECK(s.Vp == 50304);
  CHECK(num_parameters(s) == 124475904);  // GPT-2 124M with the padded vocabulary, as llm.c counts it
  const auto specs = parameter_specs(s);
  REQUIRE(specs.size() == 16);
  CHECK(specs[4].name == "qkvw");
  CHECK(specs[4].numel() == 12ll * 3 * 768 * 768);
}

TEST_CASE("the CUDA shape checks name the keys (no GPU needed)", "[model]") {
  ModelConfig m;
  m.n_embd = 256;
  m.n_head = 4;  // head_dim 64
  CHECK_NOTHROW(GPT::check_cuda_shape(m, false));
  m.n_head = 2;  // head_dim 128
  CHECK_NOTHROW(GPT::check_cuda_shape(m, false));
  m.n_head = 8;  // head_dim 32: only cuDNN attention takes it
  CHECK_THROWS_AS(GPT::check_cuda_shape(m, false), UserError);
  CHECK_THROWS_WITH(GPT::check_cuda_shape(m, false), Catch::Contains("model.n_embd / model.n_head") &&
                                                         Catch::Contains("head_dim 64 or 128"));
  CHECK_NOTHROW(GPT::check_cuda_shape(m, true));
  m.n_embd = 100;  // not a multiple of 8
  m.n_head = 1;
  CHECK_THROWS_WITH(GPT::check_cuda_shape(m, true), Catch::Contains("model.n_embd = 100"));
  m.n_embd = 24;   // 8 heads of 3 with 1 kv head: qkv width (8 + 2) * 3 = 30
  m.n_head = 8;
  m.n_kv_head = 1;
  CHECK_THROWS_WITH(GPT::check_cuda_shape(m, true), Catch::Contains("model.n_head / model.n_kv_head") &&
                                                        Catch::Contains("= 30 must be a multiple of 8"));
  m.n_kv_head = 4;  // (8 + 8) * 3 = 48: the widths pass, but cuDNN takes no head_dim of 3
  CHECK_THROWS_WITH(GPT::check_cuda_shape(m, true), Catch::Contains("model.n_embd / model.n_head") &&
                                                        Catch::Contains("multiple of 8 and at most 128"));
  m.n_embd = 256;  // head_dim 32 with cuDNN, 256 with nothing
  m.n_head = 8;
  m.n_kv_head = 2;
  CHECK_NOTHROW(GPT::check_cuda_shape(m, true));
  m.n_head = 1;
  m.n_kv_head = 1;
  CHECK_THROWS_WITH(GPT::check_cuda_shape(m, true), Catch::Contains("head_dim = 256 / 1 = 256"));
}

TEST_CASE("the CUDA compute copy keeps every parameter tensor and layer slice 16-byte aligned (no GPU needed)",
          "[model]") {
  // On cuda the model reads bf16 views at the fp32 master's element offsets: every tensor of the
  // flat buffer and every layer slice must start at a multiple of 8 elements (16 bytes of bf16)
  // for the vector loads and cuBLASLt's alignment, and Vp must be a multiple of 8 (the LM head's
  // OC). Shapes that check_cuda_shape accepts: GPT-2 124M, RoPE + GQA, odd layer counts, small
  // heads, a vocabulary that pads.
  struct Case {
    int L, C, Hq, Hkv, V, maxT;
    const char* positions;
  };
  const Case cases[] = {{12, 768, 12, 0, 50257, 1024, "learned"}, {3, 256, 4, 1, 300, 64, "rope"},
                        {5, 40, 5, 5, 61, 33, "learned"},        {2, 64, 8, 2, 1000, 7, "learned"},
                        {1, 128, 2, 1, 7, 1, "rope"}};
  for (const Case& c : cases) {
    ModelConfig m;
    m.n_layer = c.L;
    m.n_embd = c.C;
    m.n_head = c.Hq;
    m.n_kv_head = c.Hkv;
    m.vocab_size = c.V;
    m.max_seq_len = c.maxT;
    m.position_embedding = c.positions;
    INFO("L " << c.L << " C " << c.C << " Hq " << c.Hq << " Hkv " << c.Hkv << " V " << c.V);
    REQUIRE_NOTHROW(GPT::check_cuda_shape(m, /*cudnn_attention=*/true));
    const GPTShape s = GPTShape::from(m);
    CHECK(s.Vp % 8 == 0);
    int64_t offset = 0;
    int k = 0;
    for (const ParameterSpec& p : parameter_specs(s)) {
      INFO("parameter " << p.name);
      CHECK(offset % 8 == 0);
      if (k >= kFirstLayerTensor && k < kFirstLayerTensor + kNumLayerTensors) {
        REQUIRE(p.shape[0] == c.L);
        CHECK((p.numel() / c.L) % 8 == 0);  // layer l starts at offset + l * this
      }
      offset += p.numel();
      ++k;
    }
  }
}

TEST_CASE("the activation arena on cuda: bf16 activations, f32 statistics, i32 inputs (no GPU needed)", "[model]") {
  // The dtypes each op's CUDA dispatch demands (kernels/ops.h) of the buffers the model hands it:
  // LayerNorm mean / rstd, attention lse and the losses f32, tokens / targets / positions i32, the
  // forward_logits row f32 [Vp], every activation, activation gradient and all-to-all buffer bf16.
  // On cpu everything is f32 but the i32 inputs. Every buffer starts 256-byte aligned.
  ModelConfig m = tiny_model("rope", 4, 2);
  const GPTShape s = GPTShape::from(m);
  const std::set<std::string> f32_names = {"ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lse",
                                           "lnf_mean", "lnf_rstd", "losses",   "logits_row"};
  const std::set<std::string> i32_names = {"tokens", "targets", "positions"};
  for (Recompute rc : {Recompute::none, Recompute::selective, Recompute::full}) {
    for (int P : {1, 2}) {
      const GPTRunShape run{2, 16, P, P == 2 ? 8 : 0, rc};
      const int hq = s.Hq / P, hkv = s.Hkv / P;
      for (Device device : {Device::cpu, Device::cuda}) {
        INFO("recompute " << recompute_name(rc) << " P " << P << " " << device_name(device));
        bool saw_logits_row = false, saw_qkv = false;
        for (const ActivationBuffer& b : GPT::activation_layout(s, run, hq, hkv, P > 1 ? 4096 : 0, device)) {
          INFO("buffer " << b.name);
          CHECK(b.bytes % 256 == 0);
          const DType want = i32_names.count(b.name)                                 ? DType::i32
                             : f32_names.count(b.name) || device == Device::cpu ? DType::f32
                                                                                     : DType::bf16;
          CHECK(b.dtype == want);
          if (b.name == "logits_row") {
            saw_logits_row = true;
            CHECK(b.dims == std::vector<int64_t>{s.Vp});
          }
          if (b.name == "logits") CHECK(b.dims == std::vector<int64_t>{run.lm_head_chunk(), s.Vp});
          if (b.name == "qkv") {
            saw_qkv = true;
            CHECK(b.dims == std::vector<int64_t>{run.B, run.N, hq + 2 * hkv, s.d});
          }
          if (b.name == "qkv_local") CHECK(b.dims == std::vector<int64_t>{run.B, run.T(), s.qkv_heads(), s.d});
        }
        CHECK(saw_logits_row == (device == Device::cuda));  // forward_logits' fp32 row: cuda only
        CHECK(saw_qkv);
      }
    }
  }
}
