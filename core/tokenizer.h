// Tokenizers: text <-> token ids. ByteTokenizer (vocabulary 256, token = byte) and GPT2Tokenizer
// (byte-level BPE read from encoder.json/vocab.json and vocab.bpe/merges.txt). Used by
// `ulysses prepare` to make shards and by the trainer to print samples.
//
// encode() is not thread-safe (GPT2Tokenizer keeps a per-word cache); use one tokenizer per
// thread. decode() of an id outside the vocabulary gives U+FFFD; decoding a single token may
// give an incomplete UTF-8 sequence (a BPE token is a byte string, not a character).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ulysses {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(std::string_view text) = 0;
  virtual std::string decode(const std::vector<int32_t>& tokens) const = 0;
  virtual int vocab_size() const = 0;
  // The end-of-text token placed before each document by `ulysses prepare`; -1 when none.
  virtual int eot_token() const { return -1; }
};

// Every byte is its own token: encode/decode are the identity on bytes.
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text) override;
  std::string decode(const std::vector<int32_t>& tokens) const override;
  int vocab_size() const override { return 256; }
};

// GPT-2's byte-level BPE. `dir` holds encoder.json (or vocab.json): {"token": id, ...} with token
// strings in GPT-2's byte-to-unicode alphabet, and vocab.bpe (or merges.txt): one merge "a b" per
// line in rank order after an optional "#version" line. Throws UserError naming the file (and
// line) when one is missing or malformed.
class GPT2Tokenizer final : public Tokenizer {
 public:
  explicit GPT2Tokenizer(const std::string& dir);
  std::vector<int32_t> encode(std::string_view text) override;
  std::string decode(const std::vector<int32_t>& tokens) const override;
  int vocab_size() const override { return int(id_to_bytes_.size()); }
  int eot_token() const override { return eot_; }

 private:
  std::vector<int32_t> bpe(std::string_view word);  // one pre-tokenised word -> ids

  std::vector<std::string> id_to_bytes_;               // id -> raw bytes ("" for unused ids)
  std::unordered_map<std::string, int32_t> bytes_to_id_;
  int32_t byte_id_[256] = {};                          // id of each single byte
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a<<32|b) -> (rank, id)
  std::unordered_map<std::string, std::vector<int32_t>> cache_;
  int eot_ = -1;
};

// Splits text the way GPT-2's pre-tokenisation regex does:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// ASCII exactly; non-ASCII code points are classified by a small table (whitespace, digits,
// punctuation and symbol blocks) and default to letters. Invalid UTF-8 bytes count as symbols.
// Exposed for tests.
std::vector<std::string_view> gpt2_pretokenize(std::string_view text);

// Reads a whole file into memory; a UserError names the file and says what it was wanted as
// (`what`, e.g. "an input text file") when it is missing, a directory or unreadable.
std::string read_whole_file(const std::string& path, const std::string& what);
// The checks read_whole_file makes before reading (exists, not a directory, opens): a UserError
// naming the file and `what` otherwise.
void check_readable_file(const std::string& path, const std::string& what);

// "byte" or "gpt2" (reading `dir`); anything else is a UserError naming `key`.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& dir,
                                          const std::string& key = "data.tokenizer");

}  // namespace ulysses
