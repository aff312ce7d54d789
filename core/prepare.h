// `ulysses prepare`: text files -> llm.c token shards (train and val split), with the byte-level
// tokenizer (vocabulary 256) or GPT-2 BPE (given its vocabulary and merges files).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ulysses {

struct PrepareOptions {
  std::vector<std::string> inputs;   // text files, concatenated in order
  std::string output_dir;            // writes <name>_train_000000.bin, <name>_val_000000.bin, ...
  std::string name = "data";
  std::string tokenizer = "byte";    // byte | gpt2
  std::string tokenizer_dir;         // gpt2: encoder.json (or vocab.json) and vocab.bpe (or merges.txt)
  double val_fraction = 0.1;         // the last fraction of the tokens goes to val
  int64_t shard_tokens = 100'000'000;
};

// Returns the exit code; throws UserError for unreadable inputs or tokenizer files.
int run_prepare(const PrepareOptions& opts);

}  // namespace ulysses
