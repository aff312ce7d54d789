// `ulysses prepare` end to end: text files made here -> shards -> read back (TokenShard and the
// DataLoader), with the byte tokenizer and with a tiny GPT-2 vocabulary; and its input errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>

#include "core/data.h"
#include "core/base/error.h"
#include "core/prepare.h"
#include "core/tokenizer.h"
#include "data_test_util.h"

using namespace ulysses;
using Catch::Matchers::Contains;
using test::TempDir;

namespace {

// All tokens of <dir>/<name>_<split>_*.bin in file order; shard sizes appended to `sizes`.
std::vector<int32_t> read_split(const std::string& dir, const std::string& name,
                                const std::string& split, std::vector<int64_t>* sizes) {
  std::vector<int32_t> all;
  for (int i = 0;; i++) {
    const std::string p = fmt::format("{}/{}_{}_{:06d}.bin", dir, name, split, i);
    if (!std::filesystem::exists(p)) break;
    TokenShard s(p);
    sizes->push_back(s.size());
    all.insert(all.end(), s.tokens(), s.tokens() + s.size());
  }
  return all;
}

std::string make_text(int lines, int salt) {
  std::string t;
  for (int i = 0; i < lines; i++)
    t += fmt::format("Line {} of file {}: the quick brown fox's {} jumps.\n", i, salt, i * salt);
  return t;
}

}  // namespace

TEST_CASE("prepare with the byte tokenizer: shards hold the bytes, split and sized", "[prepare]") {
  TempDir dir;
  const std::string a = make_text(20, 1), b = make_text(13, 7) + "\xC3\xA9\xFF end";
  test::write_text(dir.file("a.txt"), a);
  test::write_text(dir.file("b.txt"), b);

  PrepareOptions opts;
  opts.inputs = {dir.file("a.txt"), dir.file("b.txt")};
  opts.output_dir = dir.file("out/nested");  // created
  opts.name = "tiny";
  opts.val_fraction = 0.25;
  opts.shard_tokens = 300;
  REQUIRE(run_prepare(opts) == 0);

  const std::string all = a + b;
  const size_t n_val = size_t(std::llround(all.size() * 0.25));
  std::vector<int64_t> train_sizes, val_sizes;
  std::vector<int32_t> train = read_split(opts.output_dir, "tiny", "train", &train_sizes);
  std::vector<int32_t> val = read_split(opts.output_dir, "tiny", "val", &val_sizes);
  REQUIRE(val.size() == n_val);
  REQUIRE(train.size() == all.size() - n_val);
  for (size_t i = 0; i < train.size(); i++) REQUIRE(train[i] == int(static_cast<unsigned char>(all[i])));
  for (size_t i = 0; i < val.size(); i++)
    REQUIRE(val[i] == int(static_cast<unsigned char>(all[train.size() + i])));
  // Full shards of 300 tokens, then the remainder.
  REQUIRE(train_sizes.size() == (train.size() + 299) / 300);
  for (size_t i = 0; i + 1 < train_sizes.size(); i++) REQUIRE(train_sizes[i] == 300);
  REQUIRE(train_sizes.back() == int64_t(train.size() - 300 * (train_sizes.size() - 1)));
  // nothing else is left in the directory (the temporary token spool is removed)
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(opts.output_dir)) {
    INFO(e.path().string());
    REQUIRE(e.path().filename().string().rfind("tiny_", 0) == 0);
    ++files;
  }
  REQUIRE(files == train_sizes.size() + val_sizes.size());

  // The DataLoader reads them through a glob.
  DataConfig cfg;
  cfg.train = {opts.output_dir + "/tiny_train_*.bin"};
  cfg.val = {opts.output_dir + "/tiny_val_*.bin"};
  DataLoader dl(cfg, "train", 2, 32, DataSlice{}, 0, 256);
  std::vector<int32_t> tok(64), tgt(64), pos(64);
  dl.next(tok.data(), tgt.data(), pos.data());
  for (int i = 0; i < 32; i++) {
    REQUIRE(tok[size_t(i)] == int(static_cast<unsigned char>(all[size_t(i)])));
    REQUIRE(tok[size_t(32 + i)] == int(static_cast<unsigned char>(all[size_t(32 + i)])));
  }
  DataLoader vl(cfg, "val", 1, 16, DataSlice{}, 0, 256);
  REQUIRE(vl.total_tokens() == int64_t(n_val));
}

TEST_CASE("prepare with GPT-2 BPE: an end-of-text token before each document", "[prepare]") {
  TempDir dir;
  // A vocabulary of the 256 bytes spelled in GPT-2's alphabet (printable ASCII is itself; the
  // texts below use only printable ASCII, space and newline) plus "th", "the" and <|endoftext|>.
  std::string json = "{";
  int id = 0;
  for (int b = 0; b < 256; b++) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    uint32_t cp = uint32_t(b);
    if (!printable) {
      int n = 0;
      for (int x = 0; x < b; x++) n += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174);
      cp = 256 + uint32_t(n);
    }
    json += fmt::format("{}\"\\u{:04x}\": {}", b ? ", " : "", cp, id++);
  }
  json += fmt::format(", \"th\": {}, \"the\": {}, \"<|endoftext|>\": {}}}", id, id + 1, id + 2);
  test::write_text(dir.file("encoder.json"), json);
  test::write_text(dir.file("vocab.bpe"), "#version: 0.2\nt h\nth e\n");
  test::write_text(dir.file("one.txt"), "the cat\nthe end");
  test::write_text(dir.file("two.txt"), "other things");

  PrepareOptions opts;
  opts.inputs = {dir.file("one.txt"), dir.file("two.txt")};
  opts.output_dir = dir.file("shards");
  opts.tokenizer = "gpt2";
  opts.tokenizer_dir = dir.path();
  opts.val_fraction = 0.0;
  REQUIRE(run_prepare(opts) == 0);

  std::vector<int64_t> sizes;
  std::vector<int32_t> train = read_split(opts.output_dir, "data", "train", &sizes);
  REQUIRE_FALSE(std::filesystem::exists(opts.output_dir + "/data_val_000000.bin"));
  const int th = 256, the = 257, eot = 258;
  // one.txt: eot, "the", " ", "c", "a", "t", "\n", "the", " ", "e", "n", "d"
  // two.txt: eot, "o", "the", "r", " ", "th", "i", "n", "g", "s" (" t" has no merge, "t h" has)
  const std::vector<int32_t> expected = {eot, the, ' ', 'c', 'a', 't', '\n', the, ' ', 'e', 'n', 'd',
                                         eot, 'o', the, 'r', ' ', th, 'i', 'n', 'g', 's'};
  REQUIRE(train == expected);
  GPT2Tokenizer tok(dir.path());
  REQUIRE(tok.decode(train) == "<|endoftext|>the cat\nthe end<|endoftext|>other things");
}

TEST_CASE("prepare: input errors name the file or option", "[prepare]") {
  TempDir dir;
  test::write_text(dir.file("ok.txt"), "some text");
  PrepareOptions opts;
  opts.inputs = {dir.file("ok.txt")};
  opts.output_dir = dir.file("out");

  SECTION("a missing input") {
    opts.inputs.push_back(dir.file("missing.txt"));
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains(dir.file("missing.txt")) && Contains("not found"));
    REQUIRE_FALSE(std::filesystem::exists(dir.file("out")));  // checked before anything is created
  }
  SECTION("an input that is a directory") {
    opts.inputs = {dir.path()};
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains(dir.path()) && Contains("is a directory"));
  }
  SECTION("no inputs") {
    opts.inputs.clear();
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains("no input"));
  }
  SECTION("a bad val_fraction") {
    opts.val_fraction = 1.0;
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains("val_fraction is 1"));
  }
  SECTION("an unknown tokenizer") {
    opts.tokenizer = "wordpiece";
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains("wordpiece") && Contains("byte or gpt2"));
  }
  SECTION("a GPT-2 directory without its files") {
    opts.tokenizer = "gpt2";
    opts.tokenizer_dir = dir.path();
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains(dir.path()) && Contains("encoder.json"));
  }
  SECTION("an output path that is a file") {
    opts.output_dir = dir.file("ok.txt");
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains(dir.file("ok.txt")) && Contains("output directory"));
  }
  SECTION("inputs too small to leave training tokens") {
    test::write_text(dir.file("one.txt"), "x");
    opts.inputs = {dir.file("one.txt")};
    opts.val_fraction = 0.9;  // llround(0.9) = 1 token of 1 goes to val
    REQUIRE_THROWS_WITH(run_prepare(opts), Contains("none left for training"));
    // the token spool is gone, and no shard was written
    REQUIRE(std::filesystem::is_empty(dir.file("out")));
  }
}
