// DataLoader: DP × SP slicing against a serial reference built here from the shard contents,
// shuffle determinism, epoch wrap, state/restore, globs, vocabulary checks, synthetic source.
//
// The shards hold the counter 0, 1, 2, ... (all distinct below 65536), so a sequence is
// identified by its first token, and the reference list of windows is easy to build: shard i
// of n_i tokens gives floor((n_i - 1) / N) windows of N+1 tokens, shard after shard.
#include <catch2/catch.hpp>
#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "core/data.h"
#include "core/base/error.h"
#include "data_test_util.h"

using namespace ulysses;
using Catch::Matchers::Contains;
using test::TempDir;

namespace {

constexpr int kVocab = 65536;

// Shards of the given sizes holding consecutive counter values; returns the reference windows.
std::vector<std::vector<int32_t>> make_counter_shards(const TempDir& dir, const std::string& stem,
                                                      const std::vector<int>& sizes, int N,
                                                      std::vector<std::string>* paths) {
  std::vector<std::vector<int32_t>> windows;
  uint16_t counter = 0;
  for (size_t i = 0; i < sizes.size(); i++) {
    std::vector<uint16_t> tokens(static_cast<size_t>(sizes[i]));
    for (auto& t : tokens) t = counter++;
    const std::string p = dir.file(fmt::format("{}_{:06d}.bin", stem, i));
    write_token_shard(p, tokens);
    paths->push_back(p);
    for (int w = 0; w + 1 <= (sizes[i] - 1) / N; w++)
      windows.emplace_back(tokens.begin() + w * N, tokens.begin() + w * N + N + 1);
  }
  return windows;
}

struct Batch {
  std::vector<int32_t> tokens, targets, positions;  // each [B, N/P]
};

Batch next_batch(DataLoader& dl, int B, int Np) {
  Batch b;
  b.tokens.resize(size_t(B) * Np);
  b.targets.resize(size_t(B) * Np);
  b.positions.resize(size_t(B) * Np);
  dl.next(b.tokens.data(), b.targets.data(), b.positions.data());
  return b;
}

// The sequence index whose window starts with `first_token` (counter data).
int sequence_of(const std::vector<std::vector<int32_t>>& windows, int32_t first_token) {
  for (size_t s = 0; s < windows.size(); s++)
    if (windows[s][0] == first_token) return int(s);
  return -1;
}

DataConfig shards_config(const std::vector<std::string>& train) {
  DataConfig cfg;
  cfg.source = "shards";
  cfg.train = train;
  return cfg;
}

}  // namespace

TEST_CASE("DP x SP slicing: SP slices rebuild each sequence, DP groups tile the epoch", "[data]") {
  TempDir dir;
  const int N = 8, B = 2;
  std::vector<std::string> paths;
  // 21 tokens -> 2 windows (4 tokens unused: windows never span shards), 40 -> 4, 33 -> 4.
  auto windows = make_counter_shards(dir, "t", {21, 40, 33, 57}, N, &paths);
  const int S = int(windows.size());
  REQUIRE(S == 2 + 4 + 4 + 7);
  DataConfig cfg = shards_config(paths);

  for (int P : {1, 2, 4}) {
    for (int D : {1, 2}) {
      CAPTURE(P, D);
      const int Np = N / P;
      std::vector<std::vector<std::unique_ptr<DataLoader>>> loaders(static_cast<size_t>(D));
      for (int g = 0; g < D; g++)
        for (int r = 0; r < P; r++)
          loaders[size_t(g)].push_back(std::make_unique<DataLoader>(
              cfg, "train", B, N, DataSlice{r, P, g, D}, 1234, kVocab));
      REQUIRE(loaders[0][0]->sequences_per_epoch() == S);
      REQUIRE(loaders[0][0]->total_tokens() == 21 + 40 + 33 + 57);

      const int steps_per_epoch = S / (B * D);
      std::vector<int> seen;  // sequences of epoch 0, in micro-step order over all DP groups
      for (int step = 0; step < 2 * steps_per_epoch + 1; step++) {
        const int epoch = step / steps_per_epoch, k = step % steps_per_epoch;
        std::set<int> this_step;
        for (int g = 0; g < D; g++) {
          std::vector<Batch> slices;
          for (int r = 0; r < P; r++) slices.push_back(next_batch(*loaders[size_t(g)][size_t(r)], B, Np));
          for (int b = 0; b < B; b++) {
            // Rebuild row b of the full [B, N] batch from the P slices.
            std::vector<int32_t> tok, tgt, pos;
            for (int r = 0; r < P; r++)
              for (int i = 0; i < Np; i++) {
                tok.push_back(slices[size_t(r)].tokens[size_t(b * Np + i)]);
                tgt.push_back(slices[size_t(r)].targets[size_t(b * Np + i)]);
                pos.push_back(slices[size_t(r)].positions[size_t(b * Np + i)]);
              }
            const int s = sequence_of(windows, tok[0]);
            REQUIRE(s >= 0);
            // In order: micro-step k of DP group g takes sequences k*B*D + g*B + [0, B).
            REQUIRE(s == k * B * D + g * B + b);
            for (int i = 0; i < N; i++) {
              REQUIRE(tok[size_t(i)] == windows[size_t(s)][size_t(i)]);
              REQUIRE(tgt[size_t(i)] == windows[size_t(s)][size_t(i) + 1]);
              REQUIRE(pos[size_t(i)] == i);  // global positions
            }
            REQUIRE(this_step.insert(s).second);  // no two DP groups share a sequence
            if (epoch == 0) seen.push_back(s);
          }
        }
        REQUIRE(int(this_step.size()) == B * D);
        REQUIRE(loaders[0][0]->state().epoch == uint64_t(epoch));
      }
      // Epoch 0 covered the sequences [0, steps*B*D) exactly once; the short tail is skipped.
      std::vector<int> expect(size_t(steps_per_epoch * B * D));
      std::iota(expect.begin(), expect.end(), 0);
      std::sort(seen.begin(), seen.end());
      REQUIRE(seen == expect);
    }
  }
}

TEST_CASE("shuffle: a seeded permutation per epoch, the same for every slicing", "[data]") {
  TempDir dir;
  const int N = 4;
  std::vector<std::string> paths;
  auto windows = make_counter_shards(dir, "t", {101, 80, 122}, N, &paths);
  const int S = int(windows.size());
  DataConfig cfg = shards_config(paths);
  cfg.shuffle = true;

  // The order of one epoch as seen by one rank taking one sequence per step.
  auto epoch_orders = [&](uint64_t seed, int epochs) {
    DataLoader dl(cfg, "train", 1, N, DataSlice{}, seed, kVocab);
    std::vector<std::vector<int>> orders(static_cast<size_t>(epochs));
    for (int e = 0; e < epochs; e++)
      for (int s = 0; s < S; s++)
        orders[size_t(e)].push_back(sequence_of(windows, next_batch(dl, 1, N).tokens[0]));
    return orders;
  };
  auto a = epoch_orders(42, 2);
  auto b = epoch_orders(42, 2);
  auto c = epoch_orders(43, 1);
  REQUIRE(a == b);  // deterministic
  std::vector<int> identity(static_cast<size_t>(S));
  std::iota(identity.begin(), identity.end(), 0);
  for (auto& order : a) {
    std::vector<int> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    REQUIRE(sorted == identity);  // a permutation
    REQUIRE(order != identity);   // 1/S! chance of a false failure
  }
  REQUIRE(a[0] != a[1]);  // a new order each epoch
  REQUIRE(a[0] != c[0]);  // and each seed

  // DP group g, SP rank r, B=3 sees epoch positions k*B*D + g*B + b of the same order.
  const int B = 3, D = 2, P = 2;
  for (int g = 0; g < D; g++) {
    for (int r = 0; r < P; r++) {
      DataLoader dl(cfg, "train", B, N, DataSlice{r, P, g, D}, 42, kVocab);
      for (int k = 0; k < S / (B * D); k++) {
        Batch batch = next_batch(dl, B, N / P);
        for (int b = 0; b < B; b++) {
          const int s = a[0][size_t(k * B * D + g * B + b)];
          for (int i = 0; i < N / P; i++)
            REQUIRE(batch.tokens[size_t(b * (N / P) + i)] == windows[size_t(s)][size_t(r * (N / P) + i)]);
        }
      }
    }
  }

  // Validation is read in order even with shuffle on.
  DataConfig vcfg = cfg;
  vcfg.val = paths;
  DataLoader val(vcfg, "val", 1, N, DataSlice{}, 42, kVocab);
  for (int s = 0; s < 5; s++) REQUIRE(next_batch(val, 1, N).tokens[0] == windows[size_t(s)][0]);
}

TEST_CASE("state/restore continues with the same sequences, across an epoch", "[data]") {
  TempDir dir;
  const int N = 6, B = 2, P = 2, D = 2;
  std::vector<std::string> paths;
  make_counter_shards(dir, "t", {200, 150}, N, &paths);
  DataConfig cfg = shards_config(paths);
  cfg.shuffle = true;
  DataSlice slice{1, P, 1, D};

  DataLoader a(cfg, "train", B, N, slice, 9, kVocab);
  const int steps_per_epoch = int(a.sequences_per_epoch()) / (B * D);
  for (int i = 0; i < steps_per_epoch - 3; i++) next_batch(a, B, N / P);
  const DataState saved = a.state();
  std::vector<Batch> expected;
  for (int i = 0; i < 8; i++) expected.push_back(next_batch(a, B, N / P));  // crosses the epoch
  REQUIRE(a.state().epoch == 1);

  DataLoader b(cfg, "train", B, N, slice, 9, kVocab);
  next_batch(b, B, N / P);  // a fresh loader elsewhere in the data
  b.restore(saved);
  for (int i = 0; i < 8; i++) {
    Batch got = next_batch(b, B, N / P);
    REQUIRE(got.tokens == expected[size_t(i)].tokens);
    REQUIRE(got.targets == expected[size_t(i)].targets);
    REQUIRE(got.positions == expected[size_t(i)].positions);
  }

  // reset() goes back to the first batch of epoch 0.
  DataLoader c(cfg, "train", B, N, slice, 9, kVocab);
  Batch first = next_batch(c, B, N / P);
  next_batch(c, B, N / P);
  c.reset();
  REQUIRE(c.state().epoch == 0);
  REQUIRE(c.state().next_sequence == 0);
  REQUIRE(next_batch(c, B, N / P).tokens == first.tokens);
}

TEST_CASE("shard lists: globs expand sorted, and bad lists are errors", "[data]") {
  TempDir dir;
  const int N = 4;
  std::vector<std::string> paths;
  auto windows = make_counter_shards(dir, "x_train", {9, 13, 17}, N, &paths);

  // A glob lists x_train_000000..2 sorted, whatever the directory order.
  DataConfig cfg = shards_config({dir.file("x_train_*.bin")});
  DataLoader dl(cfg, "train", 1, N, DataSlice{}, 0, kVocab);
  REQUIRE(dl.sequences_per_epoch() == int64_t(windows.size()));
  for (size_t s = 0; s < windows.size(); s++) REQUIRE(next_batch(dl, 1, N).tokens[0] == windows[s][0]);

  SECTION("a glob that matches nothing") {
    const std::string pat = dir.file("y_*.bin");
    REQUIRE_THROWS_WITH(DataLoader(shards_config({pat}), "train", 1, N, DataSlice{}, 0, kVocab),
                        Contains("data.train") && Contains(pat) && Contains("matches no file"));
  }
  SECTION("a missing plain path") {
    const std::string p = dir.file("missing.bin");
    REQUIRE_THROWS_WITH(DataLoader(shards_config({p}), "train", 1, N, DataSlice{}, 0, kVocab),
                        Contains(p) && Contains("not found"));
  }
  SECTION("no shards at all") {
    DataConfig empty = shards_config({});
    REQUIRE_THROWS_WITH(DataLoader(empty, "val", 1, N, DataSlice{}, 0, kVocab),
                        Contains("data.val") && Contains("no token shards"));
  }
  SECTION("a split too short for one micro-step") {
    // 2 + 3 + 4 = 9 sequences of 4 tokens; B=5 x D=2 needs 10.
    REQUIRE_THROWS_WITH(DataLoader(cfg, "train", 5, N, DataSlice{0, 1, 0, 2}, 0, kVocab),
                        Contains("data.train") && Contains("9 sequences") && Contains("= 10"));
    // Each shard shorter than N+1: no sequence at all.
    REQUIRE_THROWS_WITH(DataLoader(cfg, "train", 1, 64, DataSlice{}, 0, kVocab),
                        Contains("0 sequences") && Contains("65 consecutive"));
  }
  SECTION("seq_len not divisible by the SP degree") {
    REQUIRE_THROWS_WITH(DataLoader(cfg, "train", 1, 6, DataSlice{0, 4, 0, 1}, 0, kVocab),
                        Contains("train.seq_len 6") && Contains("parallel.sequence 4"));
  }
  SECTION("an unknown source") {
    DataConfig bad = cfg;
    bad.source = "parquet";
    REQUIRE_THROWS_WITH(DataLoader(bad, "train", 1, N, DataSlice{}, 0, kVocab),
                        Contains("data.source") && Contains("parquet"));
  }
}

TEST_CASE("a token id beyond the vocabulary is an error naming the file and index", "[data]") {
  TempDir dir;
  std::vector<uint16_t> good(100, 7), bad(100, 7);
  bad[17] = 300;
  bad[50] = 999;
  write_token_shard(dir.file("a.bin"), good);
  write_token_shard(dir.file("b.bin"), bad);
  DataConfig cfg = shards_config({dir.file("a.bin"), dir.file("b.bin")});
  REQUIRE_THROWS_WITH(DataLoader(cfg, "train", 1, 8, DataSlice{}, 0, 256),
                      Contains(dir.file("b.bin")) && Contains("token 300") &&
                          Contains("index 17") && Contains("vocab_size is 256"));
  // 300 fits a vocabulary of 1000.
  REQUIRE_NOTHROW(DataLoader(cfg, "train", 1, 8, DataSlice{}, 0, 1000));
  // The boundary: token == vocab_size is out of range, vocab_size - 1 is in.
  REQUIRE_THROWS_AS(DataLoader(cfg, "train", 1, 8, DataSlice{}, 0, 999), UserError);
}

TEST_CASE("synthetic source: seeded, the same sequence on every SP rank, no files", "[data]") {
  DataConfig cfg;
  cfg.source = "synthetic";
  const int N = 16, B = 3, V = 50;

  // Full sequences from P=1 loaders, per DP group.
  auto full = [&](int g, int D, uint64_t seed, int steps) {
    DataLoader dl(cfg, "train", B, N, DataSlice{0, 1, g, D}, seed, V);
    std::vector<Batch> out;
    for (int i = 0; i < steps; i++) out.push_back(next_batch(dl, B, N));
    return out;
  };
  auto ref0 = full(0, 2, 5, 3), ref1 = full(1, 2, 5, 3);
  REQUIRE(full(0, 2, 5, 3)[2].tokens == ref0[2].tokens);  // deterministic
  REQUIRE(full(0, 2, 6, 3)[0].tokens != ref0[0].tokens);  // seeded
  REQUIRE(ref0[0].tokens != ref1[0].tokens);              // DP groups differ

  std::map<int32_t, int> histogram;
  for (auto& b : ref0)
    for (int32_t t : b.tokens) {
      REQUIRE(t >= 0);
      REQUIRE(t < V);
      histogram[t]++;
    }
  REQUIRE(histogram.size() > size_t(V) / 2);  // 144 draws from 50 values: not constant

  // Within a sequence, targets are the next tokens.
  for (int b = 0; b < B; b++)
    for (int i = 0; i + 1 < N; i++)
      REQUIRE(ref0[0].targets[size_t(b * N + i)] == ref0[0].tokens[size_t(b * N + i + 1)]);

  // P=4: SP rank r holds columns [4r, 4r+4) of the same sequences, with global positions.
  const int P = 4, Np = N / P;
  for (int r = 0; r < P; r++) {
    DataLoader dl(cfg, "train", B, N, DataSlice{r, P, 1, 2}, 5, V);
    for (int step = 0; step < 3; step++) {
      Batch got = next_batch(dl, B, Np);
      for (int b = 0; b < B; b++)
        for (int i = 0; i < Np; i++) {
          const size_t src = size_t(b * N + r * Np + i), dst = size_t(b * Np + i);
          REQUIRE(got.tokens[dst] == ref1[size_t(step)].tokens[src]);
          REQUIRE(got.targets[dst] == ref1[size_t(step)].targets[src]);
          REQUIRE(got.positions[dst] == r * Np + i);
        }
    }
  }

  // train and val draw different data from the same seed.
  DataLoader tr(cfg, "train", B, N, DataSlice{}, 5, V), va(cfg, "val", B, N, DataSlice{}, 5, V);
  REQUIRE(next_batch(tr, B, N).tokens != next_batch(va, B, N).tokens);
}
