// Training data: llm.c token shards read through mmap, a seeded synthetic source, and the
// sampler that slices sequences for DP × SP.
//
// llm.c shard format: 256 int32 header (magic 20240520, version 1, token count, rest 0), then
// `count` uint16 tokens. Several shards per split are concatenated in the order given (globs
// sorted). A sequence of N tokens needs N+1 consecutive tokens (targets are shifted by one).
//
// Sampling: each shard is cut into non-overlapping windows of N+1 tokens (window w = tokens
// [w*N, w*N + N] of that shard; a window never spans two shards), and the split's sequences are
// shard 0's windows, then shard 1's, ... They are visited in order, or in a seeded per-epoch
// shuffle (train only; validation is always in order). Micro-step k of an epoch covers sequences
// [k*B*dp_size, (k+1)*B*dp_size) of the epoch order and data-parallel group g (dp_rank) takes
// [k*B*dp_size + g*B, ... + B); the epoch's tail of fewer than B*dp_size sequences is skipped.
// All ranks of one SP group read the same sequences, and SP rank r keeps tokens
// [r*N/P, (r+1)*N/P) with their targets and global position ids.
// source "synthetic": random tokens in [0, vocab_size) from (seed, split, sequence index), no
// files; its epoch is 2^40 sequences long, i.e. endless.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"

namespace ulysses {

// A validated, memory-mapped shard. Throws UserError naming the file for: missing/unreadable
// file, a directory, wrong magic, wrong version, a size that disagrees with the header's count.
class TokenShard {
 public:
  explicit TokenShard(const std::string& path);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  int64_t size() const { return count_; }
  const uint16_t* tokens() const { return tokens_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint16_t* tokens_ = nullptr;
  int64_t count_ = 0;
};

// Writes an llm.c shard (used by `ulysses prepare` and by tests). Atomic: temp file + rename.
void write_token_shard(const std::string& path, const std::vector<uint16_t>& tokens);

// Where the loader is; saved in checkpoints so resume continues with the same data.
struct DataState {
  uint64_t epoch = 0;
  uint64_t next_sequence = 0;  // index into this epoch's order, in units of global sequences
};

struct DataSlice {
  int sp_rank = 0, sp_size = 1;
  int dp_rank = 0, dp_size = 1;
};

class DataLoader {
 public:
  // split: "train" or "val". Throws UserError for bad shards, no files matching a glob, a split
  // too short for one micro-step (B * dp_size sequences), seq_len not divisible by sp_size, or a
  // token id >= vocab_size (checked at load time over all tokens, naming the file and index).
  DataLoader(const DataConfig& cfg, const std::string& split, int micro_batch, int seq_len,
             DataSlice slice, uint64_t seed, int vocab_size);
  ~DataLoader();

  // Fills this rank's micro-batch: tokens, targets and positions, each [B, N/P] int32.
  // Advances by B * dp_size global sequences (this DP group takes its own B of them).
  void next(int32_t* tokens, int32_t* targets, int32_t* positions);
  void reset();  // back to the start of epoch 0 (validation passes)

  DataState state() const { return state_; }
  void restore(const DataState& s) { state_ = s; }
  int64_t sequences_per_epoch() const { return num_sequences_; }
  int64_t total_tokens() const;
  // One line for the start-up log: the files and token counts, or that the tokens are synthetic.
  std::string describe() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  DataState state_;
  int64_t num_sequences_ = 0;
};

}  // namespace ulysses
