// `ulysses prepare` (core/prepare.h): text files -> llm.c token shards.
//
// Each input file is one document: it is tokenised on its own (with GPT-2, preceded by the
// <|endoftext|> token, as llm.c's data scripts do), and the documents are concatenated in the
// order given. The last val_fraction of all tokens becomes the validation split, the rest the
// training split; each split is written as shards of at most shard_tokens tokens:
//   <out>/<name>_train_000000.bin, <name>_train_000001.bin, ..., <name>_val_000000.bin, ...
// Memory does not grow with the corpus: each document's tokens are appended to a temporary file
// in <out> (2 bytes a token; removed on success and on error), and the shards are then cut from
// it one at a time. What is held at once: the largest input file's text and tokens, or one shard.
#include "core/prepare.h"

#include <spdlog/spdlog.h>

#include <sys/types.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/data.h"
#include "core/base/error.h"
#include "core/tokenizer.h"

namespace ulysses {

namespace {

// The tokens of every document, in order, in a temporary file (native-endian uint16, as the
// shards store them), removed when this goes out of scope.
class TokenSpool {
 public:
  explicit TokenSpool(std::string path) : path_(std::move(path)) {
    file_ = std::fopen(path_.c_str(), "w+b");
    if (!file_) throw_user_error("{}: cannot create a temporary file: {}", path_, std::strerror(errno));
  }
  ~TokenSpool() {
    std::fclose(file_);
    std::remove(path_.c_str());  // not checked: also runs while an error unwinds
  }
  TokenSpool(const TokenSpool&) = delete;
  TokenSpool& operator=(const TokenSpool&) = delete;

  void append(const std::vector<uint16_t>& tokens) {
    if (!tokens.empty() && std::fwrite(tokens.data(), 2, tokens.size(), file_) != tokens.size())
      throw_user_error("{}: cannot write {} tokens (disk full?): {}", path_, tokens.size(), std::strerror(errno));
    count_ += tokens.size();
  }
  size_t count() const { return count_; }

  // tokens [begin, begin + n)
  std::vector<uint16_t> read(size_t begin, size_t n) {
    std::vector<uint16_t> out(n);
    if (std::fflush(file_) != 0 || fseeko(file_, off_t(begin) * 2, SEEK_SET) != 0 ||
        std::fread(out.data(), 2, n, file_) != n)
      throw_user_error("{}: cannot read back tokens {} to {}: {}", path_, begin, begin + n, std::strerror(errno));
    return out;
  }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  size_t count_ = 0;
};

// Writes tokens[begin, end) of the spool as shards <dir>/<name>_<split>_NNNNNN.bin, one shard in
// memory at a time; returns the number written.
int write_split(TokenSpool& spool, size_t begin, size_t end, const std::string& dir, const std::string& name,
                const std::string& split, int64_t shard_tokens) {
  int index = 0;
  for (size_t pos = begin; pos < end; pos += size_t(shard_tokens), index++) {
    const size_t stop = std::min(end, pos + size_t(shard_tokens));
    const std::string path = fmt::format("{}/{}_{}_{:06d}.bin", dir, name, split, index);
    write_token_shard(path, spool.read(pos, stop - pos));
    spdlog::info("prepare: wrote {} ({} tokens)", path, stop - pos);
  }
  return index;
}

// Shards of this name and split left over from an earlier, larger run would be picked up by a
// glob such as <name>_train_*.bin: warn about each one.
void warn_stale_shards(const std::string& dir, const std::string& name, const std::string& split,
                       int written) {
  const std::string prefix = name + "_" + split + "_";
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string file = entry.path().filename().string();
    if (file.size() != prefix.size() + 10 || file.compare(0, prefix.size(), prefix) != 0 ||
        file.compare(file.size() - 4, 4, ".bin") != 0)
      continue;
    const std::string digits = file.substr(prefix.size(), 6);
    if (digits.find_first_not_of("0123456789") != std::string::npos) continue;
    if (std::stoi(digits) >= written)
      spdlog::warn("prepare: {} is left over from an earlier run; delete it before training on "
                   "{}*.bin",
                   entry.path().string(), prefix);
  }
}

}  // namespace

int run_prepare(const PrepareOptions& opts) {
  if (opts.inputs.empty()) throw_user_error("prepare: no input text files given");
  if (opts.output_dir.empty()) throw_user_error("prepare: no output directory given");
  if (opts.name.empty() || opts.name.find('/') != std::string::npos)
    throw_user_error("prepare: the dataset name '{}' must be non-empty and hold no '/'", opts.name);
  if (!(opts.val_fraction >= 0.0 && opts.val_fraction < 1.0))
    throw_user_error("prepare: val_fraction is {}, expected a number in [0, 1)", opts.val_fraction);
  if (opts.shard_tokens <= 0 || opts.shard_tokens > INT32_MAX)
    throw_user_error("prepare: shard_tokens is {}, expected 1 to {}", opts.shard_tokens, INT32_MAX);

  std::unique_ptr<Tokenizer> tok =
      make_tokenizer(opts.tokenizer, opts.tokenizer_dir, "prepare: the tokenizer");
  if (tok->vocab_size() > 65536)
    throw_user_error("prepare: the tokenizer has {} tokens; llm.c shards store uint16 ids (at most "
                     "65536 tokens)",
                     tok->vocab_size());

  // Every input must be readable before anything is created or written.
  for (const std::string& path : opts.inputs) check_readable_file(path, "an input text file");
  std::error_code ec;
  std::filesystem::create_directories(opts.output_dir, ec);
  if (ec || !std::filesystem::is_directory(opts.output_dir))
    throw_user_error("{}: cannot create the output directory: {}", opts.output_dir,
                     ec ? ec.message() : "a file of that name exists");

  // One document at a time: its text and tokens, appended to the spool.
  TokenSpool spool(fmt::format("{}/.{}.prepare-tokens.tmp", opts.output_dir, opts.name));
  std::vector<uint16_t> doc;
  for (const std::string& path : opts.inputs) {
    const std::string text = read_whole_file(path, "an input text file");
    doc.clear();
    if (tok->eot_token() >= 0) doc.push_back(uint16_t(tok->eot_token()));
    for (int32_t t : tok->encode(text)) doc.push_back(uint16_t(t));
    spool.append(doc);
    spdlog::info("prepare: {}: {} bytes -> {} tokens", path, text.size(), doc.size());
  }

  const size_t total = spool.count();
  const size_t n_val = size_t(std::llround(double(total) * opts.val_fraction));
  const size_t n_train = total - n_val;
  if (n_train == 0)
    throw_user_error("prepare: the inputs hold {} tokens, none left for training after a "
                     "val_fraction of {}",
                     total, opts.val_fraction);
  if (opts.val_fraction > 0 && n_val == 0)
    spdlog::warn("prepare: {} tokens are too few for a validation split of {}; writing none",
                 total, opts.val_fraction);

  const int train_shards = write_split(spool, 0, n_train, opts.output_dir, opts.name, "train", opts.shard_tokens);
  const int val_shards = write_split(spool, n_train, total, opts.output_dir, opts.name, "val", opts.shard_tokens);
  warn_stale_shards(opts.output_dir, opts.name, "train", train_shards);
  warn_stale_shards(opts.output_dir, opts.name, "val", val_shards);
  spdlog::info("prepare: {} tokens (vocabulary {}): train {} tokens in {} shard(s), val {} "
               "tokens in {} shard(s), in {}",
               total, tok->vocab_size(), n_train, train_shards, n_val, val_shards, opts.output_dir);
  return 0;
}

}  // namespace ulysses
