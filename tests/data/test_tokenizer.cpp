// Tokenizers: the byte tokenizer's round trip; GPT-2 pre-tokenisation on cases worked out by
// hand from the regex; BPE with a tiny vocabulary and merges built here (merge order, repeated
// pairs, round trips); and errors for missing or malformed vocabulary files.
#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <random>

#include "core/base/error.h"
#include "core/tokenizer.h"
#include "data_test_util.h"

using namespace ulysses;
using Catch::Matchers::Contains;
using test::TempDir;

namespace {

// GPT-2's byte alphabet, written independently of core/tokenizer.cpp: printable bytes
// (33..126, 161..172, 174..255) are themselves, the rest take U+0100, U+0101, ... in byte order.
std::string spell(const std::string& bytes) {
  std::string out;
  for (unsigned char b : bytes) {
    uint32_t cp = b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
      uint32_t n = 0;
      for (int x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) n++;
      cp = 256 + n;
    }
    if (cp < 0x80) {
      out += char(cp);
    } else {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// A byte-level vocabulary: the 256 bytes (ids 0..255 in byte order), then the results of
// `merges` (each "a b" over raw bytes) in order, then <|endoftext|>. Writes encoder.json and
// vocab.bpe into `dir`; returns the id of each token.
std::map<std::string, int> write_tiny_gpt2(const TempDir& dir,
                                           const std::vector<std::pair<std::string, std::string>>& merges,
                                           const std::string& vocab_name = "encoder.json",
                                           const std::string& merges_name = "vocab.bpe") {
  std::map<std::string, int> ids;
  std::vector<std::string> order;
  for (int b = 0; b < 256; b++) order.push_back(std::string(1, char(b)));
  for (auto& [a, b] : merges) order.push_back(a + b);
  order.push_back("<|endoftext|>");
  std::string json = "{";
  for (size_t i = 0; i < order.size(); i++) {
    if (ids.count(order[i])) continue;
    ids[order[i]] = int(ids.size());
    json += fmt::format("{}\"{}\": {}", i ? ",\n  " : "\n  ", json_escape(spell(order[i])),
                        ids[order[i]]);
  }
  json += "\n}\n";
  test::write_text(dir.file(vocab_name), json);
  std::string bpe = "#version: 0.2\n";
  for (auto& [a, b] : merges) bpe += spell(a) + " " + spell(b) + "\n";
  test::write_text(dir.file(merges_name), bpe);
  return ids;
}

std::vector<std::string> words(const std::string& s) {
  std::vector<std::string> out;
  for (std::string_view w : gpt2_pretokenize(s)) out.emplace_back(w);
  return out;
}

}  // namespace

TEST_CASE("byte tokenizer: identity on arbitrary bytes", "[tokenizer]") {
  ByteTokenizer tok;
  std::string all;
  for (int b = 0; b < 256; b++) all += char(b);
  std::mt19937 rng(3);
  for (int i = 0; i < 1000; i++) all += char(rng() & 0xFF);
  std::vector<int32_t> ids = tok.encode(all);
  REQUIRE(ids.size() == all.size());
  for (size_t i = 0; i < all.size(); i++) REQUIRE(ids[i] == int(static_cast<unsigned char>(all[i])));
  REQUIRE(tok.decode(ids) == all);
  REQUIRE(tok.vocab_size() == 256);
  REQUIRE(tok.eot_token() == -1);
  REQUIRE(tok.decode({65, 256, 66}) == "A\xEF\xBF\xBD" "B");  // out of range -> U+FFFD
}

TEST_CASE("GPT-2 pre-tokenisation splits like the regex", "[tokenizer]") {
  using V = std::vector<std::string>;
  CHECK(words("Hello world's  end!!\n\n x 123abc") ==
        V{"Hello", " world", "'s", " ", " end", "!!", "\n\n", " x", " 123", "abc"});
  CHECK(words("I'm here,   they'll go ") == V{"I", "'m", " here", ",", "  ", " they", "'ll", " go", " "});
  CHECK(words("\ttab\r\n") == V{"\t", "tab", "\r\n"});
  CHECK(words("'stop' 'x") == V{"'s", "top", "'", " '", "x"});
  CHECK(words("a\n b") == V{"a", "\n", " b"});
  CHECK(words("") == V{});
  // Non-ASCII: accented letters and CJK are letters, superscript two is a number.
  CHECK(words("h\xC3\xA9llo w\xC3\xB6rld x\xC2\xB2 \xE6\x97\xA5\xE6\x9C\xAC") ==
        V{"h\xC3\xA9llo", " w\xC3\xB6rld", " x", "\xC2\xB2", " \xE6\x97\xA5\xE6\x9C\xAC"});
  // U+00A0 (no-break space) is whitespace; U+2014 (em dash) is punctuation.
  CHECK(words("a\xC2\xA0" "b\xE2\x80\x94" "c") == V{"a", "\xC2\xA0", "b", "\xE2\x80\x94", "c"});
  // Every byte of the input is in exactly one word, in order (invalid UTF-8 included).
  std::string junk = "ab\xFF\xFE cd\xC3";
  std::string joined;
  for (auto& w : words(junk)) joined += w;
  CHECK(joined == junk);
}

TEST_CASE("GPT-2 BPE: merges by rank, every occurrence, round trips", "[tokenizer]") {
  TempDir dir;
  auto id = write_tiny_gpt2(dir, {{"l", "l"},
                                  {"h", "e"},
                                  {"he", "ll"},
                                  {"hell", "o"},
                                  {" ", "w"},
                                  {"o", "r"},
                                  {" w", "or"},
                                  {"l", "d"},
                                  {" wor", "ld"},
                                  {"a", "a"},
                                  {"aa", "aa"}});
  GPT2Tokenizer tok(dir.path());
  REQUIRE(tok.vocab_size() == 256 + 11 + 1);
  REQUIRE(tok.eot_token() == id.at("<|endoftext|>"));

  using V = std::vector<int32_t>;
  CHECK(tok.encode("hello world") == V{id.at("hello"), id.at(" world")});
  // "hellow": no merge makes "ow", so "hello" + "w".
  CHECK(tok.encode("hellow") == V{id.at("hello"), 'w'});
  // "lo": no merge, two bytes.
  CHECK(tok.encode("lo") == V{'l', 'o'});
  // "he ld": words "he" and " ld"; " l" has no merge but "l d" has.
  CHECK(tok.encode("he ld") == V{id.at("he"), ' ', id.at("ld")});
  // Every occurrence of the best pair merges, left to right: aaaaa -> aa aa a -> aaaa a.
  CHECK(tok.encode("aaaaa") == V{id.at("aaaa"), 'a'});
  CHECK(tok.encode("aaa") == V{id.at("aa"), 'a'});
  // The cache gives the same answer the second time.
  CHECK(tok.encode("hello world hello") == V{id.at("hello"), id.at(" world"), ' ', id.at("hello")});

  for (const std::string text : {"hello world", "Hello, World!\n\n  It's 2024: \xCF\x80 \xE2\x89\x88 3.14",
                                 "\xF0\x9F\x98\x80 emoji \x01\x02\x7F tail  ", "aaaaaaa  aaa\taa"}) {
    CAPTURE(text);
    REQUIRE(tok.decode(tok.encode(text)) == text);
  }
  CHECK(tok.decode({id.at("<|endoftext|>"), id.at("hello")}) == "<|endoftext|>hello");
  CHECK(tok.decode({99999}) == "\xEF\xBF\xBD");
}

TEST_CASE("GPT-2 BPE: merge rank order decides the split", "[tokenizer]") {
  TempDir first, second;
  auto id1 = write_tiny_gpt2(first, {{"a", "b"}, {"b", "c"}});
  auto id2 = write_tiny_gpt2(second, {{"b", "c"}, {"a", "b"}});
  GPT2Tokenizer t1(first.path()), t2(second.path());
  CHECK(t1.encode("abc") == std::vector<int32_t>{id1.at("ab"), 'c'});
  CHECK(t2.encode("abc") == std::vector<int32_t>{'a', id2.at("bc")});
}

TEST_CASE("GPT-2 files: vocab.json and merges.txt are accepted too", "[tokenizer]") {
  TempDir dir;
  auto id = write_tiny_gpt2(dir, {{"x", "y"}}, "vocab.json", "merges.txt");
  auto tok = make_tokenizer("gpt2", dir.path());
  CHECK(tok->encode("xyz") == std::vector<int32_t>{id.at("xy"), 'z'});
  CHECK(make_tokenizer("byte", "")->vocab_size() == 256);
  REQUIRE_THROWS_WITH(make_tokenizer("sentencepiece", ""), Contains("sentencepiece") &&
                                                               Contains("byte or gpt2"));
  REQUIRE_THROWS_WITH(make_tokenizer("gpt2", ""), Contains("tokenizer directory"));
}

TEST_CASE("GPT-2 files: missing or malformed files are errors naming the file", "[tokenizer]") {
  TempDir dir;
  write_tiny_gpt2(dir, {{"x", "y"}});
  const std::string enc = dir.file("encoder.json"), bpe = dir.file("vocab.bpe");

  SECTION("no vocabulary") {
    std::filesystem::remove(enc);
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(dir.path()) &&
                                                       Contains("encoder.json or vocab.json"));
  }
  SECTION("no merges") {
    std::filesystem::remove(bpe);
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains("vocab.bpe or merges.txt"));
  }
  SECTION("JSON syntax error, with its line") {
    test::write_text(enc, "{\n  \"a\": 1,\n  \"b\" 2\n}\n");
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(enc + ":3:") && Contains("':'"));
  }
  SECTION("JSON value not an integer") {
    test::write_text(enc, "{\"a\": 1.5}");
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(enc + ":1:") && Contains("integer"));
  }
  SECTION("JSON unterminated") {
    test::write_text(enc, "{\"a\": 1,\n");
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(enc + ":2:") && Contains("end of the file"));
  }
  SECTION("a byte missing from the vocabulary") {
    test::write_text(enc, "{\"a\": 0, \"b\": 1}");
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(enc) && Contains("byte 0x00"));
  }
  SECTION("a token id used twice") {
    std::vector<char> raw = test::read_bytes(enc);
    std::string text(raw.begin(), raw.end());
    text.insert(1, "\"dup\": 0,\n");
    test::write_text(enc, text);
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(enc) && Contains("id 0 is used twice"));
  }
  SECTION("a merges line that is not two tokens") {
    test::write_text(bpe, "#version: 0.2\nx y\nxyz\n");
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(bpe + ":3:") && Contains("two tokens"));
  }
  SECTION("a merge whose result is not in the vocabulary") {
    test::write_text(bpe, "#version: 0.2\nx y\ny z\n");
    REQUIRE_THROWS_WITH(GPT2Tokenizer(dir.path()), Contains(bpe + ":3:") && Contains("\"y z\""));
  }
}
