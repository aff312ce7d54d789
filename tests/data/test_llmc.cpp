// llm.c GPT-2 checkpoints: parameter layout and count, fp32 and bf16 round trips, the bytes on
// disk, and every malformed-file error.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "core/base/error.h"
#include "core/llmc.h"
#include "data_test_util.h"

using namespace ulysses;
using Catch::Matchers::Contains;
using test::TempDir;

namespace {

LlmcHeader small_header() {
  LlmcHeader h;
  h.max_seq_len = 12;
  h.vocab_size = 10;
  h.num_layers = 2;
  h.num_heads = 2;
  h.channels = 8;
  h.padded_vocab_size = 16;
  return h;
}

std::vector<float> random_params(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> p(n);
  for (auto& x : p) x = dist(rng);
  return p;
}

// A raw header, to plant bad values.
void write_raw_checkpoint(const std::string& path, const std::vector<int32_t>& header_fields,
                          size_t body_bytes) {
  std::vector<char> buf(1024 + body_bytes, 0);
  std::memcpy(buf.data(), header_fields.data(), header_fields.size() * sizeof(int32_t));
  test::write_bytes(path, buf.data(), buf.size());
}

}  // namespace

TEST_CASE("llm.c parameter layout: 16 tensors, GPT-2 124M has 124475904 parameters", "[llmc]") {
  LlmcHeader h = small_header();
  const size_t L = 2, C = 8, Vp = 16, T = 12;
  // Per layer: ln1 2C, qkv 3C^2 + 3C, attproj C^2 + C, ln2 2C, fc 4C^2 + 4C, fcproj 4C^2 + C.
  CHECK(llmc_param_count(h) == Vp * C + T * C + L * (12 * C * C + 13 * C) + 2 * C);
  auto t = llmc_param_tensors(h);
  CHECK(std::string(t[0].name) == "wte");
  CHECK(std::string(t[4].name) == "qkvw");
  CHECK(t[4].shape == std::vector<int64_t>{2, 24, 8});
  CHECK(t[4].offset == Vp * C + T * C + 2 * L * C);
  CHECK(std::string(t[12].name) == "fcprojw");
  CHECK(t[12].shape == std::vector<int64_t>{2, 8, 32});
  CHECK(std::string(t[15].name) == "lnfb");
  CHECK(t[15].offset + t[15].numel == llmc_param_count(h));

  LlmcHeader gpt2{3, 1024, 50257, 12, 12, 768, 50304};
  CHECK(llmc_param_count(gpt2) == 124475904);  // llm.c's "num_parameters" for gpt2_124M.bin

  ModelConfig m;
  m.n_layer = 3;
  m.n_embd = 48;
  m.n_head = 4;
  m.vocab_size = 300;
  m.max_seq_len = 64;
  LlmcHeader from = llmc_header_for(m);
  CHECK(from.version == 3);
  CHECK(from.num_layers == 3);
  CHECK(from.channels == 48);
  CHECK(from.num_heads == 4);
  CHECK(from.vocab_size == 300);
  CHECK(from.padded_vocab_size == 384);
  CHECK(from.max_seq_len == 64);
  m.n_kv_head = 2;
  REQUIRE_THROWS_WITH(llmc_header_for(m), Contains("model.n_kv_head"));
  m.n_kv_head = 0;
  m.position_embedding = "rope";
  REQUIRE_THROWS_WITH(llmc_header_for(m), Contains("model.position_embedding"));
}

TEST_CASE("llm.c fp32 checkpoint round trip, bytes as llm.c lays them out", "[llmc]") {
  TempDir dir;
  const LlmcHeader h = small_header();
  const size_t n = llmc_param_count(h);
  std::vector<float> params = random_params(n, 11);
  const std::string path = dir.file("model.bin");
  write_llmc_checkpoint(path, h, params.data(), n);

  std::vector<char> raw = test::read_bytes(path);
  REQUIRE(raw.size() == 1024 + 4 * n);
  int32_t header[256];
  std::memcpy(header, raw.data(), 1024);
  CHECK(header[0] == 20240326);
  CHECK(header[1] == 3);
  CHECK(header[2] == 12);
  CHECK(header[3] == 10);
  CHECK(header[4] == 2);
  CHECK(header[5] == 2);
  CHECK(header[6] == 8);
  CHECK(header[7] == 16);
  for (int i = 8; i < 256; i++) REQUIRE(header[i] == 0);
  float lnfb0;  // lnfb starts C floats before the end
  std::memcpy(&lnfb0, raw.data() + raw.size() - 4 * 8, 4);
  CHECK(lnfb0 == params[n - 8]);

  LlmcHeader got = read_llmc_header(path);
  CHECK(got.version == 3);
  CHECK(got.channels == 8);
  CHECK(got.padded_vocab_size == 16);
  std::vector<float> back(n, -1.0f);
  read_llmc_checkpoint(path, h, back.data(), n);
  REQUIRE(std::memcmp(back.data(), params.data(), 4 * n) == 0);
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()),
                      std::filesystem::directory_iterator()) == 1);  // no temporary left
}

TEST_CASE("llm.c bf16 checkpoint: written rounded to nearest even, read widened", "[llmc]") {
  TempDir dir;
  LlmcHeader h = small_header();
  h.version = 5;
  const size_t n = llmc_param_count(h);
  std::vector<float> params = random_params(n, 12);
  // Values whose bf16 rounding we know: bf16 keeps 8 significant bits (7 stored).
  params[0] = 1.0f + 1.0f / 256;        // halfway between 1 and 1 + 2^-7: ties to even, 1
  params[1] = 1.0f + 3.0f / 512;        // above halfway: 1 + 2^-7
  params[2] = 1.0f + 3.0f / 256;        // halfway between 1+2^-7 and 1+2^-6: ties to even, 1+2^-6
  params[3] = -2.5f;                    // exact
  params[4] = std::ldexp(1.0f, -100);   // exact power of two
  const std::string path = dir.file("bf16.bin");
  write_llmc_checkpoint(path, h, params.data(), n);
  REQUIRE(std::filesystem::file_size(path) == 1024 + 2 * n);
  REQUIRE(read_llmc_header(path).version == 5);

  LlmcHeader expected = small_header();  // the config knows nothing of the file's precision
  std::vector<float> back(n);
  read_llmc_checkpoint(path, expected, back.data(), n);
  CHECK(back[0] == 1.0f);
  CHECK(back[1] == 1.0f + 1.0f / 128);
  CHECK(back[2] == 1.0f + 1.0f / 64);
  CHECK(back[3] == -2.5f);
  CHECK(back[4] == std::ldexp(1.0f, -100));
  for (size_t i = 5; i < n; i++) {
    // Round to nearest: within half a bf16 ulp (2^-8 relative) of the original.
    REQUIRE(std::fabs(back[i] - params[i]) <= std::fabs(params[i]) * (1.0f / 256));
  }
}

TEST_CASE("llm.c checkpoint errors name the file and the disagreement", "[llmc]") {
  TempDir dir;
  const LlmcHeader h = small_header();
  const size_t n = llmc_param_count(h);
  std::vector<float> params(n, 0.5f);
  std::vector<float> out(n);
  const std::vector<int32_t> good = {20240326, 3, 12, 10, 2, 2, 8, 16};

  SECTION("missing file") {
    const std::string p = dir.file("none.bin");
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains(p) && Contains("not found"));
    REQUIRE_THROWS_WITH(read_llmc_checkpoint(p, h, out.data(), n), Contains(p) && Contains("not found"));
  }
  SECTION("a directory") {
    REQUIRE_THROWS_WITH(read_llmc_header(dir.path()), Contains(dir.path()) && Contains("directory"));
  }
  SECTION("too short for a header") {
    const std::string p = dir.file("short.bin");
    test::write_bytes(p, good.data(), good.size() * 4);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains(p) && Contains("too short") && Contains("32 bytes"));
  }
  SECTION("wrong magic") {
    const std::string p = dir.file("magic.bin");
    write_raw_checkpoint(p, {20240520, 3, 12, 10, 2, 2, 8, 16}, 4 * n);  // a token shard's magic
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains(p) && Contains("magic is 20240520") &&
                                                 Contains("expected 20240326"));
    REQUIRE_THROWS_WITH(read_llmc_checkpoint(p, h, out.data(), n), Contains("magic is 20240520"));
  }
  SECTION("unsupported version") {
    const std::string p = dir.file("v4.bin");
    write_raw_checkpoint(p, {20240326, 4, 12, 10, 2, 2, 8, 16}, 4 * n);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains(p) && Contains("version 4") &&
                                                 Contains("expected 3 (fp32) or 5 (bf16)"));
  }
  SECTION("a model that disagrees with the config, field by field") {
    const std::string p = dir.file("other.bin");
    LlmcHeader other = h;
    other.channels = 16;
    std::vector<float> big(llmc_param_count(other), 0.0f);
    write_llmc_checkpoint(p, other, big.data(), big.size());
    REQUIRE_THROWS_WITH(read_llmc_checkpoint(p, h, out.data(), n),
                        Contains(p) && Contains("channels is 16 in the file, the config says 8"));
    other = h;
    other.num_layers = 3;
    big.assign(llmc_param_count(other), 0.0f);
    write_llmc_checkpoint(p, other, big.data(), big.size());
    REQUIRE_THROWS_WITH(read_llmc_checkpoint(p, h, out.data(), n),
                        Contains("num_layers is 3 in the file, the config says 2"));
    other = h;
    other.vocab_size = 11;
    big.assign(llmc_param_count(other), 0.0f);
    write_llmc_checkpoint(p, other, big.data(), big.size());
    REQUIRE_THROWS_WITH(read_llmc_checkpoint(p, h, out.data(), n),
                        Contains("vocab_size is 11 in the file, the config says 10"));
  }
  SECTION("truncated and oversized bodies") {
    const std::string p = dir.file("cut.bin");
    write_raw_checkpoint(p, good, 4 * n - 4);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains(p) && Contains("truncated") &&
                                                 Contains(std::to_string(n) + " parameters"));
    REQUIRE_THROWS_WITH(read_llmc_checkpoint(p, h, out.data(), n), Contains("truncated"));
    write_raw_checkpoint(p, good, 4 * n + 8);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains(p) && Contains("8 bytes longer"));
  }
  SECTION("nonsense sizes in the header") {
    const std::string p = dir.file("bad.bin");
    write_raw_checkpoint(p, {20240326, 3, 12, 10, 2, 3, 8, 16}, 4 * n);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains("channels 8 is not divisible by num_heads 3"));
    write_raw_checkpoint(p, {20240326, 3, 12, 20, 2, 2, 8, 16}, 4 * n);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains("padded_vocab_size 16 is smaller than vocab_size 20"));
    write_raw_checkpoint(p, {20240326, 3, 0, 10, 2, 2, 8, 16}, 4 * n);
    REQUIRE_THROWS_WITH(read_llmc_header(p), Contains("max_seq_len is 0"));
  }
}
