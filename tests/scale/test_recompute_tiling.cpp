// Recompute and tiling (runtime.recompute, runtime.tile_tokens) change where activations live,
// not what is computed:
//   - recompute none / selective / full: the same ops on the same inputs in the same order, so
//     the loss and every gradient are bitwise equal, and the activation arena shrinks;
//   - MLP tiling: the weight gradients are summed over chunks (another float summation order),
//     so they equal the untiled ones within a tight tolerance; the arena shrinks.
// Also: the arena the constructor allocates is the one GPT::activation_layout describes.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/gpt.h"
#include "tests/test_util.h"

using namespace ulysses;

namespace {

ModelConfig small_model(const char* positions) {
  ModelConfig m;
  m.n_layer = 3;
  m.n_embd = 32;
  m.n_head = 4;
  m.vocab_size = 61;
  m.max_seq_len = 64;
  m.position_embedding = positions;
  return m;
}

struct Run {
  double loss = 0;
  std::vector<float> grads;
  size_t activation_bytes = 0;
};

Run run_model(const ModelConfig& m, GPTRunShape shape, int micro_steps = 2) {
  GPT model(m, shape, Device::cpu, nullptr);
  model.init_weights(11);
  model.zero_grad();
  const size_t BT = size_t(shape.B) * size_t(shape.N);
  std::mt19937 rng(3);
  Run r;
  for (int k = 0; k < micro_steps; ++k) {
    std::vector<int32_t> tok(BT), tgt(BT), pos(BT);
    for (size_t i = 0; i < BT; ++i) {
      tok[i] = int32_t(rng() % uint32_t(m.vocab_size));
      tgt[i] = i % 7 == 3 ? -1 : int32_t(rng() % uint32_t(m.vocab_size));  // a few ignored targets
      pos[i] = int32_t(i % size_t(shape.N));
    }
    int64_t count = 0;
    r.loss += model.forward_backward(tok.data(), tgt.data(), pos.data(), &count);
  }
  const float* g = model.grads_flat().f32();
  r.grads.assign(g, g + model.grads_flat().numel());
  r.activation_bytes = model.activation_bytes();
  return r;
}

size_t layout_bytes(const ModelConfig& m, GPTRunShape shape) {
  const GPTShape s = GPTShape::from(m);
  size_t total = 0;
  for (const ActivationBuffer& b : GPT::activation_layout(s, shape, s.Hq, s.Hkv, 0, Device::cpu)) total += b.bytes;
  return total;
}

using test::max_rel_diff;

}  // namespace

TEST_CASE("recompute none / selective / full: bitwise the same loss and gradients, less memory", "[scale]") {
  for (const char* positions : {"learned", "rope"}) {
    for (int tile : {0, 8}) {
      DYNAMIC_SECTION(positions << ", tile_tokens " << tile) {
        const ModelConfig m = small_model(positions);
        const GPTRunShape base{2, 32, 1, tile, Recompute::none};
        const Run none = run_model(m, base);
        GPTRunShape sel = base, full = base;
        sel.recompute = Recompute::selective;
        full.recompute = Recompute::full;
        const Run s = run_model(m, sel), f = run_model(m, full);
        CHECK(s.loss == none.loss);
        CHECK(f.loss == none.loss);
        REQUIRE(s.grads.size() == none.grads.size());
        CHECK(std::memcmp(s.grads.data(), none.grads.data(), none.grads.size() * 4) == 0);
        CHECK(std::memcmp(f.grads.data(), none.grads.data(), none.grads.size() * 4) == 0);
        INFO("activation bytes: none " << none.activation_bytes << ", selective " << s.activation_bytes << ", full "
                                       << f.activation_bytes);
        CHECK(s.activation_bytes < none.activation_bytes);
        CHECK(f.activation_bytes < s.activation_bytes);
        // the layout function describes exactly what the constructor allocated
        CHECK(layout_bytes(m, base) == none.activation_bytes);
        CHECK(layout_bytes(m, sel) == s.activation_bytes);
        CHECK(layout_bytes(m, full) == f.activation_bytes);
      }
    }
  }
}

TEST_CASE("a tiled MLP gives the untiled gradients up to summation order, in less memory", "[scale]") {
  const ModelConfig m = small_model("learned");
  const Run untiled = run_model(m, {2, 32, 1, 0});
  for (int tile : {5, 16, 63}) {  // uneven last chunk, even chunks, one row short of all
    DYNAMIC_SECTION("tile_tokens " << tile) {
      const Run tiled = run_model(m, {2, 32, 1, tile});
      const double loss_rel = std::abs(tiled.loss - untiled.loss) / std::abs(untiled.loss);
      const double grad_rel = max_rel_diff(tiled.grads, untiled.grads);
      INFO("loss rel diff " << loss_rel << ", max grad rel diff " << grad_rel);
      CHECK(loss_rel <= 1e-6);
      CHECK(grad_rel <= 1e-5);
      CHECK(tiled.activation_bytes < untiled.activation_bytes);
    }
  }
  // and the comparison bites: a different seed's gradients are far away
  ModelConfig other = m;
  other.init_std = 0.03;
  const Run different = run_model(other, {2, 32, 1, 16});
  CHECK(max_rel_diff(different.grads, untiled.grads) > 1e-2);
}

TEST_CASE("the activation arena: full recompute keeps one layer's workspace, per-layer cost is the residual",
          "[scale]") {
  // adding layers costs, per layer, exactly what the layout says is kept per layer
  ModelConfig m2 = small_model("rope"), m4 = small_model("rope");
  m2.n_layer = 2;
  m4.n_layer = 4;
  for (Recompute rc : {Recompute::none, Recompute::selective, Recompute::full}) {
    const GPTRunShape run{1, 64, 1, 0, rc};
    const GPTShape s = GPTShape::from(m4);
    size_t per_layer = 0;
    for (const ActivationBuffer& b : GPT::activation_layout(s, run, s.Hq, s.Hkv, 0, Device::cpu))
      if (b.layer == 0) per_layer += b.bytes;
    INFO(recompute_name(rc));
    CHECK(layout_bytes(m4, run) - layout_bytes(m2, run) == 2 * per_layer);
    if (rc == Recompute::full) CHECK(per_layer == size_t(64 * 32 * 4));  // residual3 [B*T, C] only
  }
}
