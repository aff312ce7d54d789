// `ulysses prepare` (core/prepare.h): text files -> llm.c token shards.
//
// Each input file is one document: it is tokenised on its own (with GPT-2, preceded by the
// <|endoftext|> token, as llm.c's data scripts do), and the documents are concatenated in the
// order given. The last val_fraction of all tokens becomes the validation split, the rest the
// training split; each split is written as shards of at most shard_tokens tokens:
//   <out>/<name>_train_000000.bin, <name>_train_000001.bin, ..., <name>_val_000000.bin, ...
#include "core/prepare.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <system_error>

#include "core/data.h"
#include "core/error.h"
#include "core/tokenizer.h"

namespace ulysses {

namespace {

// Writes tokens[begin, end) as shards <dir>/<name>_<split>_NNNNNN.bin; returns the number written.
int write_split(const std::vector<uint16_t>& tokens, size_t begin, size_t end,
                const std::string& dir, const std::string& name, const std::string& split,
                int64_t shard_tokens) {
  int index = 0;
  for (size_t pos = begin; pos < end; pos += size_t(shard_tokens), index++) {
    const size_t stop = std::min(end, pos + size_t(shard_tokens));
    const std::string path = fmt::format("{}/{}_{}_{:06d}.bin", dir, name, split, index);
    write_token_shard(path, std::vector<uint16_t>(tokens.begin() + std::ptrdiff_t(pos),
                                                  tokens.begin() + std::ptrdiff_t(stop)));
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

  // Read everything first, so that an unreadable input fails before any file is written.
  std::vector<uint16_t> tokens;
  for (const std::string& path : opts.inputs) {
    const std::string text = read_whole_file(path, "an input text file");
    const size_t before = tokens.size();
    if (tok->eot_token() >= 0) tokens.push_back(uint16_t(tok->eot_token()));
    for (int32_t t : tok->encode(text)) tokens.push_back(uint16_t(t));
    spdlog::info("prepare: {}: {} bytes -> {} tokens", path, text.size(), tokens.size() - before);
  }

  const size_t total = tokens.size();
  const size_t n_val = size_t(std::llround(double(total) * opts.val_fraction));
  const size_t n_train = total - n_val;
  if (n_train == 0)
    throw_user_error("prepare: the inputs hold {} tokens, none left for training after a "
                     "val_fraction of {}",
                     total, opts.val_fraction);
  if (opts.val_fraction > 0 && n_val == 0)
    spdlog::warn("prepare: {} tokens are too few for a validation split of {}; writing none",
                 total, opts.val_fraction);

  std::error_code ec;
  std::filesystem::create_directories(opts.output_dir, ec);
  if (ec || !std::filesystem::is_directory(opts.output_dir))
    throw_user_error("{}: cannot create the output directory: {}", opts.output_dir,
                     ec ? ec.message() : "a file of that name exists");

  const int train_shards =
      write_split(tokens, 0, n_train, opts.output_dir, opts.name, "train", opts.shard_tokens);
  const int val_shards =
      write_split(tokens, n_train, total, opts.output_dir, opts.name, "val", opts.shard_tokens);
  warn_stale_shards(opts.output_dir, opts.name, "train", train_shards);
  warn_stale_shards(opts.output_dir, opts.name, "val", val_shards);
  spdlog::info("prepare: {} tokens (vocabulary {}): train {} tokens in {} shard(s), val {} "
               "tokens in {} shard(s), in {}",
               total, tok->vocab_size(), n_train, train_shards, n_val, val_shards, opts.output_dir);
  return 0;
}

}  // namespace ulysses
