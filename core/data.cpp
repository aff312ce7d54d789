// Training data (core/data.h): llm.c token shards read through mmap, the synthetic source, and
// the DataLoader that turns a split into per-rank micro-batches for DP × SP.
//
// A split is a list of shards. Shard i holds floor((count_i - 1) / N) non-overlapping windows of
// N+1 tokens (window w = tokens [w*N, w*N + N]); the split's sequences are the windows of shard 0,
// then those of shard 1, ... so a window never spans two shards. An epoch visits the sequences in
// order, or in a permutation drawn from (seed, epoch) with our own Fisher-Yates over
// std::mt19937_64 (whose output the standard fixes), so every platform gets the same order.
//
// Micro-step k of an epoch covers the global sequences [k*B*D, (k+1)*B*D) of the epoch order
// (D = dp_size); DP group g takes [k*B*D + g*B, k*B*D + g*B + B). An epoch has
// floor(S / (B*D)) micro-steps; the tail of fewer than B*D sequences is skipped so that every
// DP group always reads from the same epoch order. SP rank r of P keeps tokens [r*N/P, (r+1)*N/P)
// of each sequence, the next token of each as its target, and the global position of each.
#include "core/data.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <random>

#include "core/base/error.h"
#include "core/fileio.h"

namespace ulysses {

namespace {

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr size_t kShardHeaderInts = 256;
constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// splitmix64: a fixed, portable 64-bit mixer (Steele et al.), used to derive seeds and the
// synthetic tokens from (seed, split, epoch, sequence, position).
uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform integer in [0, n) from a 64-bit generator, without modulo bias (rejection of the
// top partial block). Deterministic: depends only on the generator's output sequence.
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % n);  // multiple of n
  uint64_t x;
  do {
    x = rng();
  } while (x >= limit);
  return x % n;
}

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

// Expands each pattern (globs sorted, plain paths kept as given, so a missing plain path is
// reported by TokenShard with the file's name). `key` is the config key, for messages.
std::vector<std::string> expand_patterns(const std::vector<std::string>& patterns,
                                         const std::string& key) {
  std::vector<std::string> paths;
  for (const std::string& pat : patterns) {
    if (!has_glob_chars(pat)) {
      paths.push_back(pat);
      continue;
    }
    glob_t g{};
    int rc = ::glob(pat.c_str(), 0, nullptr, &g);
    if (rc == GLOB_NOMATCH) {
      globfree(&g);
      throw_user_error("{}: the pattern '{}' matches no file", key, pat);
    }
    if (rc != 0) {
      globfree(&g);
      throw_user_error("{}: could not expand the pattern '{}' (glob error {})", key, pat, rc);
    }
    std::vector<std::string> matches(g.gl_pathv, g.gl_pathv + g.gl_pathc);
    globfree(&g);
    std::sort(matches.begin(), matches.end());
    paths.insert(paths.end(), matches.begin(), matches.end());
  }
  return paths;
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// TokenShard

TokenShard::TokenShard(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw_user_error("{}: token shard not found (no such file)", path);
    throw_user_error("{}: cannot open token shard: {}", path, std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw_user_error("{}: cannot stat token shard: {}", path, std::strerror(e));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw_user_error("{}: is a directory, expected an llm.c token shard file", path);
  }
  const size_t file_bytes = size_t(st.st_size);
  if (file_bytes < kShardHeaderBytes) {
    ::close(fd);
    throw_user_error("{}: too short for an llm.c shard header: {} bytes, expected at least {}",
                     path, file_bytes, kShardHeaderBytes);
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED)
    throw_user_error("{}: cannot read token shard (mmap failed: {})", path, std::strerror(map_errno));
  map_ = map;
  map_bytes_ = file_bytes;

  // From here on, a throw must unmap: the destructor does not run for a throwing constructor.
  auto fail = [&](const std::string& msg) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw UserError(msg);
  };
  int32_t header[kShardHeaderInts];
  std::memcpy(header, map_, kShardHeaderBytes);
  if (header[0] != kShardMagic)
    fail(fmt::format("{}: not an llm.c token shard: magic is {}, expected {}", path, header[0],
                     kShardMagic));
  if (header[1] != kShardVersion)
    fail(fmt::format("{}: unsupported token shard version {}, expected {}", path, header[1],
                     kShardVersion));
  const int64_t count = header[2];
  if (count <= 0)
    fail(fmt::format("{}: the header says the shard holds {} tokens, expected at least 1", path,
                     count));
  const size_t expected_bytes = kShardHeaderBytes + size_t(count) * sizeof(uint16_t);
  if (file_bytes < expected_bytes)
    fail(fmt::format("{}: truncated: the header says {} tokens ({} bytes with the header), the "
                     "file has {} bytes",
                     path, count, expected_bytes, file_bytes));
  if (file_bytes > expected_bytes)
    fail(fmt::format("{}: oversized: the header says {} tokens ({} bytes with the header), the "
                     "file has {} bytes ({} extra)",
                     path, count, expected_bytes, file_bytes, file_bytes - expected_bytes));
  count_ = count;
  tokens_ = reinterpret_cast<const uint16_t*>(static_cast<const char*>(map_) + kShardHeaderBytes);
  ::madvise(map_, map_bytes_, MADV_WILLNEED);
}

TokenShard::~TokenShard() {
  if (map_) ::munmap(map_, map_bytes_);
}

void write_token_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  if (tokens.empty()) throw_user_error("{}: refusing to write a token shard with no tokens", path);
  if (tokens.size() > size_t(INT32_MAX))
    throw_user_error("{}: {} tokens do not fit one llm.c shard (at most {})", path, tokens.size(),
                     INT32_MAX);
  int32_t header[kShardHeaderInts] = {};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = int32_t(tokens.size());

  write_file_atomically(path, [&](int fd, const std::string& tmp) {
    write_all(fd, header, kShardHeaderBytes, tmp);
    write_all(fd, tokens.data(), tokens.size() * sizeof(uint16_t), tmp);
  });
}

// ----------------------------------------------------------------------------------------------
// DataLoader

struct DataLoader::Impl {
  int B = 0, N = 0, P = 1, D = 1, sp_rank = 0, dp_rank = 0;
  int vocab_size = 0;
  bool synthetic = false;
  bool shuffle = false;
  uint64_t seed = 0;  // already mixed with the split

  std::vector<std::unique_ptr<TokenShard>> shards;
  std::vector<int64_t> first_sequence;  // first_sequence[i]: index of shard i's first window

  // Epoch order, built lazily for the epoch in `order_epoch` (shuffle only).
  std::vector<int64_t> order;
  uint64_t order_epoch = UINT64_MAX;

  // The sequence index (within the split) at position `pos` of `epoch`'s order.
  int64_t sequence_at(uint64_t epoch, int64_t pos, int64_t num_sequences) {
    if (!shuffle || synthetic) return pos;
    if (order_epoch != epoch) {
      order.resize(size_t(num_sequences));
      for (int64_t i = 0; i < num_sequences; i++) order[size_t(i)] = i;
      std::mt19937_64 rng(mix64(seed ^ mix64(epoch)));
      for (int64_t i = num_sequences - 1; i > 0; i--) {  // Fisher-Yates
        int64_t j = int64_t(uniform_below(rng, uint64_t(i) + 1));
        std::swap(order[size_t(i)], order[size_t(j)]);
      }
      order_epoch = epoch;
    }
    return order[size_t(pos)];
  }

  // Writes the N+1-token window of sequence `s` restricted to [begin, begin + count + 1).
  void window(uint64_t epoch, int64_t s, int begin, int count, int32_t* out) const {
    if (synthetic) {
      // Counter-based: token t of sequence s depends on (seed, epoch, s, t) only, so every SP
      // rank of a group computes the same sequence without generating the whole window.
      const uint64_t key = mix64(seed ^ mix64(epoch * 0x2545F4914F6CDD1Dull + uint64_t(s)));
      for (int i = 0; i <= count; i++)
        out[i] = int32_t(mix64(key + uint64_t(begin + i)) % uint64_t(vocab_size));
      return;
    }
    size_t shard = size_t(std::upper_bound(first_sequence.begin(), first_sequence.end(), s) -
                          first_sequence.begin()) - 1;
    const uint16_t* t = shards[shard]->tokens() + (s - first_sequence[shard]) * N + begin;
    for (int i = 0; i <= count; i++) out[i] = t[i];
  }
};

DataLoader::DataLoader(const DataConfig& cfg, const std::string& split, int micro_batch,
                       int seq_len, DataSlice slice, uint64_t seed, int vocab_size)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (split != "train" && split != "val")
    throw_user_error("data split '{}': expected train or val", split);
  if (micro_batch <= 0) throw_user_error("train.micro_batch_size is {}, expected > 0", micro_batch);
  if (seq_len <= 0) throw_user_error("train.seq_len is {}, expected > 0", seq_len);
  if (vocab_size <= 0) throw_user_error("model.vocab_size is {}, expected > 0", vocab_size);
  if (slice.sp_size <= 0 || seq_len % slice.sp_size != 0)
    throw_user_error("train.seq_len {} is not divisible by parallel.sequence {}", seq_len,
                     slice.sp_size);
  ULYSSES_ASSERT(slice.sp_rank >= 0 && slice.sp_rank < slice.sp_size, "sp_rank {} of {}",
                 slice.sp_rank, slice.sp_size);
  ULYSSES_ASSERT(slice.dp_size > 0 && slice.dp_rank >= 0 && slice.dp_rank < slice.dp_size,
                 "dp_rank {} of {}", slice.dp_rank, slice.dp_size);
  m.B = micro_batch;
  m.N = seq_len;
  m.P = slice.sp_size;
  m.D = slice.dp_size;
  m.sp_rank = slice.sp_rank;
  m.dp_rank = slice.dp_rank;
  m.vocab_size = vocab_size;
  // Validation is always read in order; the split is mixed into the seed so that synthetic
  // train and val data differ.
  m.shuffle = cfg.shuffle && split == "train";
  m.seed = mix64(seed ^ (split == "train" ? 0x747261696E000000ull : 0x76616C0000000000ull));

  const int64_t per_step = int64_t(m.B) * m.D;
  if (cfg.source == "synthetic") {
    m.synthetic = true;
    // Endless in practice: 2^40 sequences before the first epoch boundary.
    num_sequences_ = (int64_t(1) << 40) / per_step * per_step;
    return;
  }
  if (cfg.source != "shards")
    throw_user_error("data.source is '{}', expected shards or synthetic", cfg.source);

  const std::string key = "data." + split;
  const std::vector<std::string>& patterns = split == "train" ? cfg.train : cfg.val;
  if (patterns.empty()) throw_user_error("{} lists no token shards", key);
  for (const std::string& path : expand_patterns(patterns, key)) {
    auto shard = std::make_unique<TokenShard>(path);
    // Token ids must index the embedding: check every token once, here.
    const uint16_t* t = shard->tokens();
    const int64_t n = shard->size();
    uint16_t max_token = 0;
    for (int64_t i = 0; i < n; i++) max_token = std::max(max_token, t[i]);
    if (int(max_token) >= vocab_size) {
      int64_t i = 0;
      while (int(t[i]) < vocab_size) i++;
      throw_user_error("{}: token {} at index {} is out of range: model.vocab_size is {}", path,
                       t[i], i, vocab_size);
    }
    m.first_sequence.push_back(num_sequences_);
    num_sequences_ += (n - 1) / m.N;
    m.shards.push_back(std::move(shard));
  }
  if (num_sequences_ < per_step)
    throw_user_error("{}: the shards hold {} sequences of {} tokens (each needs {} consecutive "
                     "tokens in one shard), but one micro-step needs micro_batch_size {} x "
                     "data-parallel size {} = {}",
                     key, num_sequences_, m.N, m.N + 1, m.B, m.D, per_step);
}

DataLoader::~DataLoader() = default;

void DataLoader::next(int32_t* tokens, int32_t* targets, int32_t* positions) {
  Impl& m = *impl_;
  const int64_t per_step = int64_t(m.B) * m.D;
  if (state_.next_sequence + uint64_t(per_step) > uint64_t(num_sequences_)) {
    state_.epoch++;
    state_.next_sequence = 0;
  }
  const int Np = m.N / m.P;
  const int begin = m.sp_rank * Np;  // first global position of this SP rank
  std::vector<int32_t> window(size_t(Np) + 1);
  for (int b = 0; b < m.B; b++) {
    const int64_t pos = int64_t(state_.next_sequence) + int64_t(m.dp_rank) * m.B + b;
    const int64_t s = m.sequence_at(state_.epoch, pos, num_sequences_);
    m.window(state_.epoch, s, begin, Np, window.data());
    for (int i = 0; i < Np; i++) {  // row b of the [B, N/P] outputs
      tokens[size_t(b) * Np + i] = window[size_t(i)];
      targets[size_t(b) * Np + i] = window[size_t(i) + 1];
      positions[size_t(b) * Np + i] = begin + i;
    }
  }
  state_.next_sequence += uint64_t(per_step);
}

void DataLoader::reset() { state_ = DataState{}; }

std::string DataLoader::describe() const {
  const Impl& m = *impl_;
  if (m.synthetic)
    return fmt::format("synthetic (data.source: synthetic): random tokens in [0, {}), no files read; the loss "
                       "stays near ln({}) = {:.2f}",
                       m.vocab_size, m.vocab_size, std::log(double(m.vocab_size)));
  const std::string files = m.shards.size() == 1
                                ? m.shards.front()->path()
                                : fmt::format("{} .. {}", m.shards.front()->path(), m.shards.back()->path());
  return fmt::format("{} shard{} ({}), {} tokens, {} sequences of {} tokens{}", m.shards.size(),
                     m.shards.size() == 1 ? "" : "s", files, total_tokens(), num_sequences_, m.N,
                     m.shuffle ? ", shuffled each epoch" : "");
}

int64_t DataLoader::total_tokens() const {
  if (impl_->synthetic) return num_sequences_ * (impl_->N + 1);
  int64_t total = 0;
  for (const auto& s : impl_->shards) total += s->size();
  return total;
}

}  // namespace ulysses
