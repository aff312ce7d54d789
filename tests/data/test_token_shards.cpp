// llm.c token shards: write/read round trip, and each malformed file rejected with a message
// that names the file and says what was expected.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <random>

#include "core/data.h"
#include "core/base/error.h"
#include "data_test_util.h"

using namespace ulysses;
using Catch::Matchers::Contains;
using test::TempDir;

TEST_CASE("token shard round trip keeps every token and writes the llm.c header", "[data]") {
  TempDir dir;
  std::mt19937 rng(7);
  std::vector<uint16_t> tokens(12345);
  for (auto& t : tokens) t = uint16_t(rng() & 0xFFFF);
  tokens[0] = 0;
  tokens[1] = 65535;  // the extremes of uint16
  const std::string path = dir.file("s.bin");
  write_token_shard(path, tokens);

  // The bytes on disk: header ints, then little-endian uint16 tokens.
  std::vector<char> raw = test::read_bytes(path);
  REQUIRE(raw.size() == 1024 + 2 * tokens.size());
  int32_t header[256];
  std::memcpy(header, raw.data(), 1024);
  CHECK(header[0] == 20240520);
  CHECK(header[1] == 1);
  CHECK(header[2] == int32_t(tokens.size()));
  for (int i = 3; i < 256; i++) REQUIRE(header[i] == 0);

  TokenShard shard(path);
  REQUIRE(shard.size() == int64_t(tokens.size()));
  CHECK(shard.path() == path);
  for (size_t i = 0; i < tokens.size(); i++) REQUIRE(shard.tokens()[i] == tokens[i]);

  // The temporary file was renamed away: the directory holds only the shard.
  int files = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator(dir.path())) files++;
  CHECK(files == 1);

  // Overwriting replaces the content.
  write_token_shard(path, {1, 2, 3});
  TokenShard again(path);
  REQUIRE(again.size() == 3);
  CHECK(again.tokens()[2] == 3);
}

TEST_CASE("write_token_shard refuses an empty shard", "[data]") {
  TempDir dir;
  REQUIRE_THROWS_AS(write_token_shard(dir.file("e.bin"), {}), UserError);
  CHECK_FALSE(std::filesystem::exists(dir.file("e.bin")));
}

TEST_CASE("malformed token shards are rejected with the file and the expectation", "[data]") {
  TempDir dir;
  const std::vector<uint16_t> ten(10, 5);

  SECTION("missing file") {
    const std::string p = dir.file("nope.bin");
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("not found"));
  }
  SECTION("a directory") {
    REQUIRE_THROWS_WITH(TokenShard(dir.path()), Contains(dir.path()) && Contains("is a directory"));
  }
  SECTION("too short for a header") {
    const std::string p = dir.file("short.bin");
    std::vector<char> bytes(100, 0);
    test::write_bytes(p, bytes.data(), bytes.size());
    REQUIRE_THROWS_WITH(TokenShard(p),
                        Contains(p) && Contains("too short") && Contains("100 bytes") &&
                            Contains("1024"));
  }
  SECTION("empty file") {
    const std::string p = dir.file("empty.bin");
    test::write_bytes(p, "", 0);
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("0 bytes"));
  }
  SECTION("wrong magic") {
    const std::string p = dir.file("magic.bin");
    test::write_raw_shard(p, 20240326, 1, 10, ten);  // a checkpoint's magic, not a shard's
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("magic is 20240326") &&
                                           Contains("expected 20240520"));
  }
  SECTION("wrong version") {
    const std::string p = dir.file("version.bin");
    test::write_raw_shard(p, 20240520, 2, 10, ten);
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("version 2") && Contains("expected 1"));
  }
  SECTION("truncated body") {
    const std::string p = dir.file("trunc.bin");
    test::write_raw_shard(p, 20240520, 1, 11, ten);
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("truncated") &&
                                           Contains("11 tokens") && Contains("1044 bytes"));
  }
  SECTION("oversized body") {
    const std::string p = dir.file("over.bin");
    test::write_raw_shard(p, 20240520, 1, 9, ten);
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("oversized") &&
                                           Contains("9 tokens") && Contains("2 extra"));
  }
  SECTION("zero tokens") {
    const std::string p = dir.file("zero.bin");
    test::write_raw_shard(p, 20240520, 1, 0, {});
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("0 tokens") &&
                                           Contains("expected at least 1"));
  }
  SECTION("negative count") {
    const std::string p = dir.file("neg.bin");
    test::write_raw_shard(p, 20240520, 1, -4, ten);
    REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("-4 tokens"));
  }
  SECTION("unreadable file") {
    const std::string p = dir.file("locked.bin");
    write_token_shard(p, ten);
    ::chmod(p.c_str(), 0);
    if (::geteuid() == 0) {
      WARN("running as root: permissions do not stop reads, the unreadable case is not exercised");
    } else {
      REQUIRE_THROWS_WITH(TokenShard(p), Contains(p) && Contains("cannot open"));
    }
  }
}
