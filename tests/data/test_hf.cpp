// Hugging Face GPT-2 checkpoints (core/hf.h): export + import round trip (bitwise), a hand-built
// safetensors file whose known values must land in known places (the Conv1D transposes, the
// stripped vocabulary padding), BF16 / F16 widening, config.json checks, and every malformed-file
// error naming the file and the tensor or field.
#include <catch2/catch.hpp>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>

#include <fmt/format.h>

#include "core/base/error.h"
#include "core/hf.h"
#include "core/llmc.h"
#include "data_test_util.h"

using namespace ulysses;
using Catch::Matchers::Contains;
using test::TempDir;

namespace {

// L 2, C 8, H 2, V 10 (padded to 128), 12 positions
ModelConfig small_model() {
  ModelConfig m;
  m.n_layer = 2;
  m.n_embd = 8;
  m.n_head = 2;
  m.vocab_size = 10;
  m.max_seq_len = 12;
  return m;
}

size_t count(const ModelConfig& m) { return llmc_param_count(llmc_header_for(m)); }

// Random parameters with wte's padding rows 0 (as an import leaves them).
std::vector<float> random_params(const ModelConfig& m, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> p(count(m));
  for (auto& x : p) x = dist(rng);
  std::fill(p.begin() + m.vocab_size * m.n_embd, p.begin() + m.padded_vocab_size() * m.n_embd, 0.0f);
  return p;
}

// A safetensors file written by hand: `header` JSON text as given, then `body`.
void write_raw(const std::string& path, const std::string& header, const std::string& body) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char(n >> (8 * i));
  test::write_text(path, out + header + body);
}

std::string config_json(const ModelConfig& m) { return hf_gpt2_config_json(m); }

}  // namespace

TEST_CASE("HF export then import gives bitwise the same parameters", "[hf]") {
  TempDir dir;
  const ModelConfig m = small_model();
  const std::vector<float> p = random_params(m, 7);
  write_hf_checkpoint(dir.file("out"), m, p.data(), p.size());
  REQUIRE(std::filesystem::exists(dir.file("out/config.json")));
  std::vector<float> back(p.size(), 123.0f);
  read_hf_checkpoint(dir.file("out"), m, back.data(), back.size());
  REQUIRE(std::memcmp(back.data(), p.data(), p.size() * 4) == 0);
  // the bare .safetensors file, config.json beside it, reads the same
  std::fill(back.begin(), back.end(), 0.0f);
  read_hf_checkpoint(dir.file("out/model.safetensors"), m, back.data(), back.size());
  REQUIRE(std::memcmp(back.data(), p.data(), p.size() * 4) == 0);

  // the file holds exactly GPT-2's tensors: wte without padding rows, 12 per layer, ln_f; no lm_head
  SafetensorsReader r(dir.file("out/model.safetensors"));
  CHECK(r.entries().size() == size_t(2 + 12 * m.n_layer + 2));
  CHECK(r.find("transformer.wte.weight")->shape == std::vector<int64_t>{10, 8});
  CHECK(r.find("transformer.wpe.weight")->shape == std::vector<int64_t>{12, 8});
  CHECK(r.find("transformer.h.1.attn.c_attn.weight")->shape == std::vector<int64_t>{8, 24});
  CHECK(r.find("transformer.h.1.mlp.c_proj.weight")->shape == std::vector<int64_t>{32, 8});
  CHECK(r.find("lm_head.weight") == nullptr);
  CHECK(r.find("transformer.h.0.attn.c_attn.weight")->dtype == "F32");

  const HfGpt2Config c = parse_hf_gpt2_config(config_json(m), "config.json");
  CHECK(c.n_layer == 2);
  CHECK(c.n_embd == 8);
  CHECK(c.n_head == 2);
  CHECK(c.vocab_size == 10);
  CHECK(c.n_positions == 12);
}

TEST_CASE("a hand-built HF file: values land where ulysses keeps them, Conv1D weights transposed", "[hf]") {
  TempDir dir;
  const ModelConfig m = small_model();
  const int L = m.n_layer, C = m.n_embd, V = m.vocab_size, T = m.max_seq_len;
  // Every element's value encodes (tensor, layer, index): 1000 * k + 100 * l + i / 1000.
  auto values = [](int k, int l, size_t n) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = float(1000 * k + 100 * l) + float(i) / 1000.0f;
    return v;
  };
  std::vector<NamedTensor> t;  // GPT2Model names (no "transformer." prefix), plus the mask buffer
  t.push_back({"wte.weight", {V, C}, values(0, 0, size_t(V * C))});
  t.push_back({"wpe.weight", {T, C}, values(1, 0, size_t(T * C))});
  const std::pair<const char*, std::vector<int64_t>> layer_tensors[] = {
      {"ln_1.weight", {C}},          {"ln_1.bias", {C}},       {"attn.c_attn.weight", {C, 3 * C}},
      {"attn.c_attn.bias", {3 * C}}, {"attn.c_proj.weight", {C, C}}, {"attn.c_proj.bias", {C}},
      {"ln_2.weight", {C}},          {"ln_2.bias", {C}},       {"mlp.c_fc.weight", {C, 4 * C}},
      {"mlp.c_fc.bias", {4 * C}},    {"mlp.c_proj.weight", {4 * C, C}}, {"mlp.c_proj.bias", {C}}};
  for (int l = 0; l < L; ++l) {
    int k = 2;
    for (const auto& [name, shape] : layer_tensors) {
      size_t n = 1;
      for (int64_t d : shape) n *= size_t(d);
      t.push_back({fmt::format("h.{}.{}", l, name), shape, values(k++, l, n)});
    }
    t.push_back({fmt::format("h.{}.attn.bias", l), {1, 1, T, T}, std::vector<float>(size_t(T * T), 1.0f)});
  }
  t.push_back({"ln_f.weight", {C}, values(14, 0, size_t(C))});
  t.push_back({"ln_f.bias", {C}, values(15, 0, size_t(C))});
  t.push_back({"lm_head.weight", {V, C}, values(0, 0, size_t(V * C))});  // tied: equal to wte
  write_safetensors(dir.file("model.safetensors"), t);  // no config.json: shapes inferred

  std::vector<float> p(count(m), -1.0f);
  read_hf_checkpoint(dir.file("model.safetensors"), m, p.data(), p.size());
  const auto layout = llmc_param_tensors(llmc_header_for(m));
  auto at = [&](int k, size_t i) { return p[layout[size_t(k)].offset + i]; };
  auto code = [](int k, int l, size_t i) { return float(1000 * k + 100 * l) + float(i) / 1000.0f; };
  // wte [Vp, C]: row v col c <- HF [v, c]; padding rows 0
  CHECK(at(0, 3 * size_t(C) + 5) == code(0, 0, 3 * size_t(C) + 5));
  CHECK(at(0, size_t(V * C)) == 0.0f);
  CHECK(at(0, size_t(m.padded_vocab_size() * C - 1)) == 0.0f);
  CHECK(at(1, 7) == code(1, 0, 7));  // wpe
  // qkvw [L, 3C, C]: layer 1, row r (output), col c (input) <- c_attn [c, r] = index c * 3C + r
  for (int r : {0, 5, 3 * C - 1})
    for (int c : {0, 2, C - 1})
      CHECK(at(4, size_t(3 * C * C) + size_t(r * C + c)) == code(4, 1, size_t(c * 3 * C + r)));
  // attprojw [L, C, C]: layer 0, row r, col c <- c_proj [c, r]
  CHECK(at(6, size_t(2 * C + 5)) == code(6, 0, size_t(5 * C + 2)));
  // fcw [L, 4C, C]: layer 1 row 17 col 3 <- c_fc [3, 17]
  CHECK(at(10, size_t(4 * C * C) + size_t(17 * C + 3)) == code(10, 1, size_t(3 * 4 * C + 17)));
  // fcprojw [L, C, 4C]: layer 0 row 2 col 30 <- mlp.c_proj [30, 2]
  CHECK(at(12, size_t(2 * 4 * C + 30)) == code(12, 0, size_t(30 * C + 2)));
  // vectors unchanged: qkvb layer 1 element 9, fcprojb layer 0, ln_f
  CHECK(at(5, size_t(3 * C) + 9) == code(5, 1, 9));
  CHECK(at(13, 4) == code(13, 0, 4));
  CHECK(at(2, size_t(C) + 1) == code(2, 1, 1));  // ln1w layer 1
  CHECK(at(15, 6) == code(15, 0, 6));

  // and exporting them again gives HF's layout back, value for value
  const std::vector<NamedTensor> again = hf_gpt2_tensors(m, p.data(), p.size());
  for (const NamedTensor& e : again) {
    const std::string bare = e.name.substr(12);  // without "transformer."
    const auto it = std::find_if(t.begin(), t.end(), [&](const NamedTensor& x) { return x.name == bare; });
    REQUIRE(it != t.end());
    CHECK(it->shape == e.shape);
    CHECK(it->values == e.values);
  }
}

TEST_CASE("HF import widens BF16 and F16 tensors", "[hf]") {
  TempDir dir;
  // 1 layer, C 2, V 2, 1 position: the file of a real model, one tensor's dtype varied
  ModelConfig m;
  m.n_layer = 1;
  m.n_embd = 2;
  m.n_head = 1;
  m.vocab_size = 2;
  m.max_seq_len = 1;
  std::vector<float> p(count(m), 0.0f);
  write_hf_checkpoint(dir.path(), m, p.data(), p.size());
  // rewrite ln_f.weight [2] as BF16 {1.5, -2.0} and ln_f.bias as F16 {0.5, 65504 (max half)},
  // with one subnormal half in wpe: 2^-24
  SafetensorsReader r(dir.file("model.safetensors"));
  std::string header = "{", body;
  for (const SafetensorsEntry& e : r.entries()) {
    std::string dtype = "F32", bytes;
    if (e.name == "transformer.ln_f.weight") {
      dtype = "BF16";
      bytes = std::string("\xC0\x3F\x00\xC0", 4);  // 0x3FC0 = 1.5, 0xC000 = -2
    } else if (e.name == "transformer.ln_f.bias") {
      dtype = "F16";
      bytes = std::string("\x00\x38\xFF\x7B", 4);  // 0x3800 = 0.5, 0x7BFF = 65504
    } else if (e.name == "transformer.wpe.weight") {
      dtype = "F16";
      bytes = std::string("\x01\x00\x00\x80", 4);  // 0x0001 = 2^-24, 0x8000 = -0
    } else {
      const std::vector<float> v = r.read_f32(e.name, e.shape);
      bytes.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    }
    header += fmt::format("{}\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", header.size() > 1 ? "," : "",
                          e.name, dtype, fmt::join(e.shape, ","), body.size(), body.size() + bytes.size());
    body += bytes;
  }
  write_raw(dir.file("model.safetensors"), header + "}", body);
  std::vector<float> out(p.size(), 9.0f);
  read_hf_checkpoint(dir.path(), m, out.data(), out.size());
  const auto layout = llmc_param_tensors(llmc_header_for(m));
  CHECK(out[layout[14].offset] == 1.5f);
  CHECK(out[layout[14].offset + 1] == -2.0f);
  CHECK(out[layout[15].offset] == 0.5f);
  CHECK(out[layout[15].offset + 1] == 65504.0f);
  CHECK(out[layout[1].offset] == std::ldexp(1.0f, -24));
  CHECK(std::signbit(out[layout[1].offset + 1]));
}

TEST_CASE("config.json: what ulysses cannot honour is refused, naming the field", "[hf]") {
  const ModelConfig m = small_model();
  const std::string good = config_json(m);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const size_t at = s.find(from);
    REQUIRE(at != std::string::npos);
    return s.replace(at, from.size(), to);
  };
  REQUIRE_NOTHROW(parse_hf_gpt2_config(good, "c.json"));
  REQUIRE_NOTHROW(parse_hf_gpt2_config(with("\"gelu_new\"", "\"gelu_pytorch_tanh\""), "c.json"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"gelu_new\"", "\"relu\""), "c.json"),
                      Contains("c.json") && Contains("activation_function is \"relu\""));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"layer_norm_epsilon\": 1e-05", "\"layer_norm_epsilon\": 1e-6"), "c.json"),
                      Contains("layer_norm_epsilon is 1e-06") && Contains("1e-5"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"n_inner\": null", "\"n_inner\": 16"), "c.json"),
                      Contains("n_inner is 16") && Contains("32"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false"), "c.json"),
                      Contains("tie_word_embeddings is false"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"model_type\": \"gpt2\"", "\"model_type\": \"llama\""), "c.json"),
                      Contains("model_type is \"llama\""));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"scale_attn_by_inverse_layer_idx\": false",
                                                "\"scale_attn_by_inverse_layer_idx\": true"), "c.json"),
                      Contains("scale_attn_by_inverse_layer_idx is true"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"n_embd\": 8", "\"n_embd\": -8"), "c.json"),
                      Contains("field \"n_embd\" is -8, expected a positive integer"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"n_head\": 2", "\"n_head\": 3"), "c.json"),
                      Contains("n_embd 8 is not divisible by n_head 3"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config(with("\"n_layer\": 2,", ""), "c.json"), Contains("missing field \"n_layer\""));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config("{\"n_layer\": 2", "c.json"), Contains("c.json: not valid JSON"));
  REQUIRE_THROWS_WITH(parse_hf_gpt2_config("[1, 2]", "c.json"), Contains("is array, expected a JSON object"));
}

TEST_CASE("HF checkpoint errors name the file, the tensor or field, and the expectation", "[hf]") {
  TempDir dir;
  const ModelConfig m = small_model();
  const std::vector<float> p = random_params(m, 3);
  std::vector<float> out(p.size());
  write_hf_checkpoint(dir.file("ok"), m, p.data(), p.size());
  const std::string st = dir.file("ok/model.safetensors");
  const std::vector<char> good = test::read_bytes(st);
  uint64_t hlen = 0;
  std::memcpy(&hlen, good.data(), 8);
  const std::string header(good.data() + 8, size_t(hlen)), body(good.data() + 8 + hlen, good.size() - 8 - hlen);
  auto plant = [&](const std::string& name, const std::string& h, const std::string& b) {
    std::filesystem::create_directories(dir.file(name));
    test::write_text(dir.file(name + "/config.json"), config_json(m));
    write_raw(dir.file(name + "/model.safetensors"), h, b);
    return dir.file(name);
  };
  auto load = [&](const std::string& path) { read_hf_checkpoint(path, m, out.data(), out.size()); };
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = header;
    const size_t at = s.find(from);
    REQUIRE(at != std::string::npos);
    return s.replace(at, from.size(), to);
  };

  SECTION("config disagreement names both") {
    ModelConfig other = m;
    other.n_embd = 16;
    std::vector<float> big(count(other));
    REQUIRE_THROWS_WITH(read_hf_checkpoint(dir.file("ok"), other, big.data(), big.size()),
                        Contains("ok/config.json: n_embd is 8 in the checkpoint, model.n_embd is 16 in the config"));
    other = m;
    other.max_seq_len = 16;
    big.resize(count(other));
    REQUIRE_THROWS_WITH(read_hf_checkpoint(dir.file("ok"), other, big.data(), big.size()),
                        Contains("n_positions is 12 in the checkpoint, model.max_seq_len is 16"));
    // without config.json the tensors say it
    std::filesystem::create_directories(dir.file("bare"));
    std::filesystem::copy_file(st, dir.file("bare/m.safetensors"));
    other = m;
    other.vocab_size = 11;
    big.resize(count(other));
    REQUIRE_THROWS_WITH(read_hf_checkpoint(dir.file("bare/m.safetensors"), other, big.data(), big.size()),
                        Contains("vocab_size (wte.weight's rows) is 10 in the checkpoint, model.vocab_size is 11"));
    other = m;
    other.position_embedding = "rope";
    REQUIRE_THROWS_WITH(read_hf_checkpoint(dir.file("ok"), other, big.data(), big.size()),
                        Contains("model.position_embedding"));
  }
  SECTION("missing files") {
    REQUIRE_THROWS_WITH(load(dir.file("nothing.safetensors")), Contains("nothing.safetensors: safetensors file not found"));
    std::filesystem::create_directories(dir.file("empty"));
    REQUIRE_THROWS_WITH(load(dir.file("empty")), Contains("empty: no config.json"));
    test::write_text(dir.file("empty/config.json"), config_json(m));
    REQUIRE_THROWS_WITH(load(dir.file("empty")), Contains("empty: no model.safetensors"));
  }
  SECTION("truncated") {
    REQUIRE_THROWS_WITH(load(plant("t1", header, body.substr(0, body.size() - 4))),
                        Contains("t1/model.safetensors") && Contains("outside the") && Contains("data buffer"));
    test::write_text(dir.file("t2.safetensors"), std::string("\x10\x00\x00", 3));
    REQUIRE_THROWS_WITH(load(dir.file("t2.safetensors")), Contains("t2.safetensors: truncated: 3 bytes"));
    std::string raw(8, '\0');
    raw[0] = char(200);
    test::write_text(dir.file("t3.safetensors"), raw + header.substr(0, 40));
    REQUIRE_THROWS_WITH(load(dir.file("t3.safetensors")),
                        Contains("t3.safetensors: truncated: the header length is 200 bytes, only 40 follow"));
  }
  SECTION("absurd header length") {
    std::string raw(8, '\xFF');
    test::write_text(dir.file("huge.safetensors"), raw + "{}");
    REQUIRE_THROWS_WITH(load(dir.file("huge.safetensors")), Contains("huge.safetensors: header length") && Contains("absurd"));
  }
  SECTION("not JSON, not an object") {
    REQUIRE_THROWS_WITH(load(plant("nj", "{\"a\": [1, 2", body)), Contains("nj/model.safetensors: the safetensors header is not valid JSON"));
    REQUIRE_THROWS_WITH(load(plant("arr", "[1, 2]", body)), Contains("is array, expected a JSON object"));
    REQUIRE_THROWS_WITH(load(plant("ent", "{\"x\": 3}", body)), Contains("tensor \"x\": entry is number"));
    // a shape whose element count would wrap around 64 bits with offsets that claim 0 bytes
    REQUIRE_THROWS_WITH(load(plant("wrap", "{\"x\": {\"dtype\": \"F32\", \"shape\": [1099511627776, 1099511627776, "
                                           "1099511627776], \"data_offsets\": [0, 0]}}", body)),
                        Contains("tensor \"x\": shape") && Contains("absurdly large"));
    REQUIRE_THROWS_WITH(load(plant("negdim", "{\"x\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 0]}}", body)),
                        Contains("is not a list of non-negative integers"));
  }
  SECTION("header lies about offsets") {
    // ln_f.weight [8] F32 = 32 bytes claims 36; ln_f.bias past the end, reversed, overlapping ln_f.weight
    const SafetensorsReader r(st);
    const SafetensorsEntry* b = r.find("transformer.ln_f.bias");
    const SafetensorsEntry* w = r.find("transformer.ln_f.weight");
    const std::string old = fmt::format("[{},{}]", b->begin, b->end);
    const std::string old_w = fmt::format("[{},{}]", w->begin, w->end);
    REQUIRE_THROWS_WITH(load(plant("len", with(old_w, fmt::format("[{},{}]", w->begin, w->end + 4)), body)),
                        Contains("tensor \"transformer.ln_f.weight\": data_offsets") && Contains("hold 36 bytes") &&
                            Contains("needs 32"));
    REQUIRE_THROWS_WITH(load(plant("oob", with(old, fmt::format("[{},{}]", body.size(), body.size() + 32)), body)),
                        Contains("tensor \"transformer.ln_f.bias\"") && Contains("outside the"));
    REQUIRE_THROWS_WITH(load(plant("ovl", with(old, fmt::format("[{},{}]", w->begin + 4, w->begin + 36)), body)),
                        Contains("overlap") && Contains("transformer.ln_f.bias") && Contains("transformer.ln_f.weight"));
    REQUIRE_THROWS_WITH(load(plant("neg", with(old, fmt::format("[{},{}]", b->end, b->begin)), body)),
                        Contains("transformer.ln_f.bias") && Contains("outside the"));
    REQUIRE_THROWS_WITH(load(plant("offs", with(old, "[1]"), body)),
                        Contains("\"data_offsets\" must be [begin, end]"));
  }
  SECTION("wrong dtype, unknown dtype") {
    // I32 has F32's size: the header is consistent, the tensor is not a float
    const std::string key = "\"transformer.ln_f.bias\":{\"data_offsets\"";
    std::string h = header;
    const size_t at = h.find(key);
    REQUIRE(at != std::string::npos);
    const size_t dt = h.find("\"F32\"", at);
    REQUIRE_THROWS_WITH(load(plant("i32", std::string(h).replace(dt, 5, "\"I32\""), body)),
                        Contains("tensor \"transformer.ln_f.bias\" has dtype I32, expected F32, BF16 or F16"));
    REQUIRE_THROWS_WITH(load(plant("q4", std::string(h).replace(dt, 5, "\"Q4\""), body)),
                        Contains("tensor \"transformer.ln_f.bias\": unknown dtype \"Q4\""));
  }
  SECTION("missing, misshapen, unexpected and untied tensors") {
    SafetensorsReader r(st);
    auto rewrite = [&](const std::string& name, const std::function<void(std::vector<NamedTensor>&)>& edit) {
      std::vector<NamedTensor> t;
      for (const SafetensorsEntry& e : r.entries()) t.push_back({e.name, e.shape, r.read_f32(e.name, e.shape)});
      edit(t);
      std::filesystem::create_directories(dir.file(name));
      test::write_text(dir.file(name + "/config.json"), config_json(m));
      write_safetensors(dir.file(name + "/model.safetensors"), t);
      return dir.file(name);
    };
    auto drop = [](const std::string& n) {
      return [n](std::vector<NamedTensor>& t) {
        t.erase(std::remove_if(t.begin(), t.end(), [&](const NamedTensor& x) { return x.name == n; }), t.end());
      };
    };
    REQUIRE_THROWS_WITH(load(rewrite("miss", drop("transformer.h.1.mlp.c_fc.bias"))),
                        Contains("miss/model.safetensors: tensor \"transformer.h.1.mlp.c_fc.bias\" is missing (expected shape [32])"));
    REQUIRE_THROWS_WITH(load(rewrite("shape", [](std::vector<NamedTensor>& t) {
                          for (auto& x : t)
                            if (x.name == "transformer.h.0.attn.c_attn.weight") x.shape = {24, 8};  // nn.Linear's
                        })),
                        Contains("tensor \"transformer.h.0.attn.c_attn.weight\" has shape [24, 8], expected [8, 24]"));
    REQUIRE_THROWS_WITH(load(rewrite("extra", [](std::vector<NamedTensor>& t) {
                          t.push_back({"transformer.h.2.ln_1.weight", {8}, std::vector<float>(8, 1.0f)});
                        })),
                        Contains("unexpected tensor \"transformer.h.2.ln_1.weight\""));
    REQUIRE_THROWS_WITH(load(rewrite("untied", [](std::vector<NamedTensor>& t) {
                          t.push_back({"lm_head.weight", {10, 8}, std::vector<float>(80, 0.5f)});
                        })),
                        Contains("lm_head.weight differs from wte.weight"));
  }
}
