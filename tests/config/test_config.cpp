// Tests of core/config.cpp and core/base/log.cpp: every key loads into the right field, every class of
// bad input gives the documented message (with file:line:col and a suggestion), --set overrides,
// validate_for_world, and to_yaml round trips (of tricky values and of every file in configs/).
#include <catch2/catch.hpp>
#include <spdlog/spdlog.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/base/error.h"
#include "core/base/log.h"

using namespace ulysses;
namespace fs = std::filesystem;

namespace {

// A minimal valid document: the default data source (shards) would need token files.
const std::string kSynthetic = "data:\n  source: synthetic\n";

// The UserError message of loading `yaml` (as "test.yaml") with `overrides`; fails if none.
std::string load_error(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    load_config_string(yaml, "test.yaml", overrides);
  } catch (const UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError for:\n" << yaml);
  return "";
}

std::string world_error(const Config& c, int world_size) {
  try {
    validate_for_world(c, world_size);
  } catch (const UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError from validate_for_world(world_size=" << world_size << ")");
  return "";
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Every field, compared exactly (doubles by their bits).
void require_same(const Config& a, const Config& b) {
  REQUIRE(a.model.n_layer == b.model.n_layer);
  REQUIRE(a.model.n_embd == b.model.n_embd);
  REQUIRE(a.model.n_head == b.model.n_head);
  REQUIRE(a.model.n_kv_head == b.model.n_kv_head);
  REQUIRE(a.model.vocab_size == b.model.vocab_size);
  REQUIRE(a.model.max_seq_len == b.model.max_seq_len);
  REQUIRE(a.model.position_embedding == b.model.position_embedding);
  REQUIRE(same_bits(a.model.rope_theta, b.model.rope_theta));
  REQUIRE(same_bits(a.model.init_std, b.model.init_std));
  REQUIRE(a.parallel.sequence == b.parallel.sequence);
  REQUIRE(a.parallel.emulate_sequence == b.parallel.emulate_sequence);
  REQUIRE(a.parallel.zero_stage == b.parallel.zero_stage);
  REQUIRE(a.parallel.backend == b.parallel.backend);
  REQUIRE(a.train.seq_len == b.train.seq_len);
  REQUIRE(a.train.micro_batch_size == b.train.micro_batch_size);
  REQUIRE(a.train.global_batch_tokens == b.train.global_batch_tokens);
  REQUIRE(a.train.max_steps == b.train.max_steps);
  REQUIRE(same_bits(a.train.lr, b.train.lr));
  REQUIRE(same_bits(a.train.min_lr_ratio, b.train.min_lr_ratio));
  REQUIRE(a.train.warmup_steps == b.train.warmup_steps);
  REQUIRE(a.train.lr_schedule == b.train.lr_schedule);
  REQUIRE(same_bits(a.train.weight_decay, b.train.weight_decay));
  REQUIRE(same_bits(a.train.beta1, b.train.beta1));
  REQUIRE(same_bits(a.train.beta2, b.train.beta2));
  REQUIRE(same_bits(a.train.eps, b.train.eps));
  REQUIRE(same_bits(a.train.grad_clip, b.train.grad_clip));
  REQUIRE(a.train.seed == b.train.seed);
  REQUIRE(a.train.eval_interval == b.train.eval_interval);
  REQUIRE(a.train.eval_steps == b.train.eval_steps);
  REQUIRE(a.train.sample_tokens == b.train.sample_tokens);
  REQUIRE(same_bits(a.train.sample_temperature, b.train.sample_temperature));
  REQUIRE(a.train.max_skipped_steps == b.train.max_skipped_steps);
  REQUIRE(a.data.train == b.data.train);
  REQUIRE(a.data.val == b.data.val);
  REQUIRE(a.data.source == b.data.source);
  REQUIRE(a.data.shuffle == b.data.shuffle);
  REQUIRE(a.data.tokenizer == b.data.tokenizer);
  REQUIRE(a.data.tokenizer_dir == b.data.tokenizer_dir);
  REQUIRE(a.runtime.device == b.runtime.device);
  REQUIRE(a.runtime.recompute == b.runtime.recompute);
  REQUIRE(a.runtime.offload == b.runtime.offload);
  REQUIRE(a.runtime.tile_tokens == b.runtime.tile_tokens);
  REQUIRE(a.runtime.attention == b.runtime.attention);
  REQUIRE(a.runtime.threads == b.runtime.threads);
  REQUIRE(same_bits(a.runtime.comm_timeout, b.runtime.comm_timeout));
  REQUIRE(a.runtime.overlap_comm == b.runtime.overlap_comm);
  REQUIRE(a.runtime.all_to_all_chunks == b.runtime.all_to_all_chunks);
  REQUIRE(a.checkpoint.dir == b.checkpoint.dir);
  REQUIRE(a.checkpoint.interval == b.checkpoint.interval);
  REQUIRE(a.checkpoint.keep_last == b.checkpoint.keep_last);
  REQUIRE(a.checkpoint.resume == b.checkpoint.resume);
  REQUIRE(a.checkpoint.init_from == b.checkpoint.init_from);
  REQUIRE(a.checkpoint.export_llmc == b.checkpoint.export_llmc);
  REQUIRE(a.checkpoint.export_hf == b.checkpoint.export_hf);
  REQUIRE(a.logging.level == b.logging.level);
  REQUIRE(a.logging.interval == b.logging.interval);
  REQUIRE(a.logging.metrics_file == b.logging.metrics_file);
  REQUIRE(a.logging.all_ranks == b.logging.all_ranks);
}

// Every key set to a value different from its default (except parallel.emulate_sequence, which
// cannot be combined with parallel.sequence > 1, the conflict tests cover it; and model.init_std,
// which checkpoint.init_from makes moot, checked on its own).
const char* kEveryKey = R"(model:
  n_layer: 3
  n_embd: 96
  n_head: 6
  n_kv_head: 3
  vocab_size: 300
  max_seq_len: 512
  position_embedding: rope
  rope_theta: 500000.0
parallel:
  sequence: 3
  emulate_sequence: 0
  zero_stage: 2
  backend: mpi
train:
  seq_len: 384
  micro_batch_size: 2
  global_batch_tokens: 7680
  max_steps: 77
  lr: 6.0e-4
  min_lr_ratio: 0.25
  warmup_steps: 7
  lr_schedule: linear
  weight_decay: 0.05
  beta1: 0.8
  beta2: 0.99
  eps: 1.0e-6
  grad_clip: 0.5
  seed: 18446744073709551615
  eval_interval: 11
  eval_steps: 3
  sample_tokens: 16
  sample_temperature: 0.7
  max_skipped_steps: 9
data:
  train: [a_train_*.bin, "b train.bin"]
  val: c_val.bin
  source: shards
  shuffle: true
  tokenizer: gpt2
  tokenizer_dir: /tok
runtime:
  device: cuda
  recompute: full
  offload: checkpoints
  tile_tokens: 1024
  attention: cudnn
  threads: 2
  comm_timeout: 12.5
  overlap_comm: true
  all_to_all_chunks: 4
checkpoint:
  dir: ckpt
  interval: 10
  keep_last: 4
  resume: auto
  init_from: gpt2_124M.bin
  export_llmc: out.bin
logging:
  level: debug
  interval: 5
  metrics_file: m.jsonl
  all_ranks: yes
)";

}  // namespace

TEST_CASE("every key loads into its field", "[config]") {
  Config c = load_config_string(kEveryKey, "every.yaml");
  CHECK(c.source == "every.yaml");
  CHECK(c.model.n_layer == 3);
  CHECK(c.model.n_embd == 96);
  CHECK(c.model.n_head == 6);
  CHECK(c.model.n_kv_head == 3);
  CHECK(c.model.vocab_size == 300);
  CHECK(c.model.max_seq_len == 512);
  CHECK(c.model.position_embedding == "rope");
  CHECK(c.model.rope_theta == 500000.0);
  CHECK(load_config_string(kSynthetic + "model:\n  init_std: 0.015\n", "t.yaml").model.init_std == 0.015);
  CHECK(c.parallel.sequence == 3);
  CHECK(c.parallel.emulate_sequence == 0);
  CHECK(c.parallel.zero_stage == 2);
  CHECK(c.parallel.backend == "mpi");
  CHECK(c.train.seq_len == 384);
  CHECK(c.train.micro_batch_size == 2);
  CHECK(c.train.global_batch_tokens == 7680);
  CHECK(c.train.max_steps == 77);
  CHECK(c.train.lr == 6.0e-4);
  CHECK(c.train.min_lr_ratio == 0.25);
  CHECK(c.train.warmup_steps == 7);
  CHECK(c.train.lr_schedule == "linear");
  CHECK(c.train.weight_decay == 0.05);
  CHECK(c.train.beta1 == 0.8);
  CHECK(c.train.beta2 == 0.99);
  CHECK(c.train.eps == 1.0e-6);
  CHECK(c.train.grad_clip == 0.5);
  CHECK(c.train.seed == std::numeric_limits<uint64_t>::max());
  CHECK(c.train.eval_interval == 11);
  CHECK(c.train.eval_steps == 3);
  CHECK(c.train.sample_tokens == 16);
  CHECK(c.train.sample_temperature == 0.7);
  CHECK(c.train.max_skipped_steps == 9);
  CHECK(c.data.train == std::vector<std::string>{"a_train_*.bin", "b train.bin"});
  CHECK(c.data.val == std::vector<std::string>{"c_val.bin"});  // a single string is a 1-list
  CHECK(c.data.source == "shards");
  CHECK(c.data.shuffle == true);
  CHECK(c.data.tokenizer == "gpt2");
  CHECK(c.data.tokenizer_dir == "/tok");
  CHECK(c.runtime.device == "cuda");
  CHECK(c.runtime.recompute == "full");
  CHECK(c.runtime.offload == "checkpoints");
  CHECK(c.runtime.overlap_comm);
  CHECK(c.runtime.all_to_all_chunks == 4);
  CHECK(c.runtime.tile_tokens == 1024);
  CHECK(c.runtime.attention == "cudnn");
  CHECK(c.runtime.threads == 2);
  CHECK(c.runtime.comm_timeout == 12.5);
  CHECK(c.checkpoint.dir == "ckpt");
  CHECK(c.checkpoint.interval == 10);
  CHECK(c.checkpoint.keep_last == 4);
  CHECK(c.checkpoint.resume == "auto");
  CHECK(c.checkpoint.init_from == "gpt2_124M.bin");
  CHECK(c.checkpoint.export_llmc == "out.bin");
  CHECK(c.logging.level == "debug");
  CHECK(c.logging.interval == 5);
  CHECK(c.logging.metrics_file == "m.jsonl");
  CHECK(c.logging.all_ranks == true);

}

TEST_CASE("keys left out keep the struct defaults", "[config]") {
  Config loaded = load_config_string(kSynthetic, "t.yaml");
  Config expected;
  expected.data.source = "synthetic";
  require_same(loaded, expected);
  // An empty group and an empty document are fine too.
  require_same(load_config_string("model:\n" + kSynthetic, "t.yaml"), expected);
  CHECK(load_error("") .find("key 'data.train' is required") != std::string::npos);
}

TEST_CASE("the embedded default is configs/tiny.yaml", "[config]") {
  Config embedded = load_config("");
  Config file = load_config(ULYSSES_SOURCE_DIR "/configs/tiny.yaml");
  CHECK(embedded.source == "<embedded default>");
  require_same(embedded, file);
  // The shape the docs promise.
  CHECK(embedded.model.n_layer == 4);
  CHECK(embedded.model.n_embd == 128);
  CHECK(embedded.model.n_head == 4);
  CHECK(embedded.model.vocab_size == 256);
  CHECK(embedded.train.seq_len == 128);
  CHECK(embedded.model.position_embedding == "learned");
  CHECK(embedded.data.source == "synthetic");
}

TEST_CASE("unknown keys name file:line:col and suggest the nearest key", "[config][errors]") {
  CHECK(load_error(kSynthetic + "train:\n  lrr: 0.1\n") ==
        "test.yaml:4:3: unknown key 'train.lrr' (did you mean 'train.lr'?)");
  CHECK(load_error("modle:\n  n_layer: 2\n" + kSynthetic) ==
        "test.yaml:1:1: unknown key 'modle' (did you mean 'model'?)");
  CHECK(load_error("model:\n  n_layers: 2\n" + kSynthetic) ==
        "test.yaml:2:3: unknown key 'model.n_layers' (did you mean 'model.n_layer'?)");
  // The right name in the wrong group, and a key at the top level.
  CHECK(load_error("model:\n  lr: 0.1\n") ==
        "test.yaml:2:3: unknown key 'model.lr' (did you mean 'train.lr'?)");
  CHECK(load_error("seq_len: 64\n") ==
        "test.yaml:1:1: unknown key 'seq_len' (did you mean 'train.seq_len'?)");
  // Nothing close: the valid keys are listed.
  std::string far = load_error("runtime:\n  zzzzzzzzzz: 1\n");
  CHECK(far.rfind("test.yaml:2:3: unknown key 'runtime.zzzzzzzzzz'; valid keys in 'runtime' are: "
                  "device, recompute, offload, tile_tokens, attention, threads, comm_timeout",
                  0) == 0);
  CHECK(load_error("model:\n  n_layer: 2\nmodel:\n  n_embd: 64\n") ==
        "test.yaml:3:1: group 'model' appears twice (first at test.yaml:1:1)");
  CHECK(load_error("train:\n  lr: 0.1\n  lr: 0.2\n") ==
        "test.yaml:3:3: key 'train.lr' appears twice (first at test.yaml:2:7)");
}

TEST_CASE("wrong types are rejected with what was expected", "[config][errors]") {
  CHECK(load_error("model:\n  n_layer: four\n") ==
        "test.yaml:2:12: key 'model.n_layer': expected an integer >= 1, got 'four'");
  CHECK(load_error("model:\n  n_layer: 2.5\n") ==
        "test.yaml:2:12: key 'model.n_layer': expected an integer >= 1, got '2.5'");
  CHECK(load_error("model:\n  n_layer: \"4\"\n") ==
        "test.yaml:2:12: key 'model.n_layer': expected an integer >= 1, got the quoted string '4'");
  CHECK(load_error("train:\n  lr: [1, 2]\n") ==
        "test.yaml:2:7: key 'train.lr': expected a positive number, got a list");
  CHECK(load_error("train:\n  lr: {a: 1}\n") ==
        "test.yaml:2:7: key 'train.lr': expected a positive number, got a map");
  CHECK(load_error("train:\n  lr:\n") ==
        "test.yaml:2:3: key 'train.lr': expected a positive number, got an empty value");
  CHECK(load_error("train:\n  lr: .inf\n") ==
        "test.yaml:2:7: key 'train.lr': expected a positive number, got '.inf'");
  CHECK(load_error("data:\n  shuffle: maybe\n") ==
        "test.yaml:2:12: key 'data.shuffle': expected true or false, got 'maybe'");
  CHECK(load_error("train:\n  seed: -1\n") ==
        "test.yaml:2:9: key 'train.seed': expected a non-negative integer, got '-1'");
  CHECK(load_error("train:\n  max_steps: 3000000000\n") ==
        "test.yaml:2:14: key 'train.max_steps': expected an integer >= 0, got '3000000000' (out of "
        "range)");
  CHECK(load_error("data:\n  train: [a.bin, [b.bin]]\n") ==
        "test.yaml:2:10: key 'data.train': expected a list of strings (or a single string), but an "
        "item is a list");
  CHECK(load_error("model: 3\n") == "test.yaml:1:8: key 'model': expected a map of model keys, got '3'");
  CHECK(load_error("- model\n") ==
        "test.yaml:1:1: expected a map of groups (model, parallel, train, data, runtime, "
        "checkpoint, logging), got a list");
  std::string syntax = load_error("model: [1, 2\n");
  CHECK(syntax.rfind("test.yaml:", 0) == 0);
  CHECK(syntax.find("invalid YAML") != std::string::npos);
}

TEST_CASE("out-of-range values are rejected", "[config][errors]") {
  CHECK(load_error("train:\n  lr: -1\n") ==
        "test.yaml:2:7: key 'train.lr': expected a positive number, got '-1'");
  CHECK(load_error("train:\n  lr: 0\n") ==
        "test.yaml:2:7: key 'train.lr': expected a positive number, got '0'");
  CHECK(load_error("train:\n  beta1: 1.0\n") ==
        "test.yaml:2:10: key 'train.beta1': expected a number in [0, 1), got '1.0'");
  CHECK(load_error("train:\n  beta2: -0.1\n") ==
        "test.yaml:2:10: key 'train.beta2': expected a number in [0, 1), got '-0.1'");
  CHECK(load_error("train:\n  min_lr_ratio: 1.5\n") ==
        "test.yaml:2:17: key 'train.min_lr_ratio': expected a number in [0, 1], got '1.5'");
  CHECK(load_error("model:\n  n_layer: 0\n") ==
        "test.yaml:2:12: key 'model.n_layer': expected an integer >= 1, got '0'");
  CHECK(load_error("train:\n  seq_len: 0\n") ==
        "test.yaml:2:12: key 'train.seq_len': expected an integer >= 1, got '0'");
  CHECK(load_error("parallel:\n  zero_stage: 4\n") ==
        "test.yaml:2:15: key 'parallel.zero_stage': expected an integer in 0..3, got '4'");
  CHECK(load_error("model:\n  vocab_size: 70000\n") ==
        "test.yaml:2:15: key 'model.vocab_size': expected an integer in 1..65536, got '70000'");
  CHECK(load_error("train:\n  weight_decay: -0.1\n") ==
        "test.yaml:2:17: key 'train.weight_decay': expected a number >= 0, got '-0.1'");
  CHECK(load_error("logging:\n  interval: 0\n") ==
        "test.yaml:2:13: key 'logging.interval': expected an integer >= 1, got '0'");
}

TEST_CASE("enumerated strings list the allowed values", "[config][errors]") {
  CHECK(load_error("model:\n  position_embedding: rop\n") ==
        "test.yaml:2:23: key 'model.position_embedding': expected one of learned, rope, got 'rop' "
        "(did you mean 'rope'?)");
  struct Case { const char* group; const char* key; const char* allowed; };
  const Case cases[] = {
      {"train", "lr_schedule", "cosine, constant, linear"},
      {"runtime", "recompute", "none, selective, full"},
      {"runtime", "offload", "none, checkpoints"},
      {"runtime", "device", "auto, cpu, cuda"},
      {"parallel", "backend", "auto, mpi, nccl"},
      {"runtime", "attention", "auto, flash, cudnn"},
      {"data", "source", "shards, synthetic"},
      {"data", "tokenizer", "byte, gpt2"},
      {"logging", "level", "trace, debug, info, warn, error"},
  };
  for (const Case& c : cases) {
    std::string yaml = fmt::format("{}:\n  {}: bogus\n", c.group, c.key);
    std::string expected =
        fmt::format("test.yaml:2:{}: key '{}.{}': expected one of {}, got 'bogus'",
                    std::strlen(c.key) + 5, c.group, c.key, c.allowed);
    CHECK(load_error(yaml) == expected);
  }
}

TEST_CASE("required keys", "[config][errors]") {
  CHECK(load_error("data:\n  source: shards\n") ==
        "test.yaml:2:11: key 'data.train' is required when data.source is 'shards': list the token "
        "shard files (paths or globs), or set data.source: synthetic");
  CHECK(load_error("model:\n  n_layer: 2\n").rfind("test.yaml: key 'data.train' is required", 0) == 0);
  CHECK_NOTHROW(load_config_string("data:\n  train: x.bin\n", "t.yaml"));
  CHECK(load_error("data:\n  source: synthetic\n  tokenizer: gpt2\ntrain:\n  sample_tokens: 10\n")
            .find("key 'data.tokenizer_dir' is required") != std::string::npos);
}

TEST_CASE("conflicts between keys", "[config][errors]") {
  const std::string d = kSynthetic;  // lines 1-2
  CHECK(load_error(d + "model:\n  n_embd: 100\n  n_head: 3\n") ==
        "test.yaml:5:11: key 'model.n_embd' (100) must be divisible by model.n_head (3): each "
        "head gets n_embd / n_head channels");
  CHECK(load_error(d + "model:\n  n_head: 8\n  n_kv_head: 3\n") ==
        "test.yaml:5:14: key 'model.n_kv_head' (3) must divide model.n_head (8): valid values are "
        "1, 2, 4, 8 (0 means n_head)");
  CHECK(load_error(d + "model:\n  n_embd: 36\n  n_head: 4\n  position_embedding: rope\n") ==
        "test.yaml:6:23: model.position_embedding 'rope' rotates channel pairs and needs an even "
        "head_dim, but n_embd / n_head = 36 / 4 = 9");
  CHECK_NOTHROW(load_config_string(d + "model:\n  n_embd: 36\n  n_head: 4\n", "t.yaml"));
  CHECK(load_error(d + "model:\n  max_seq_len: 64\n") ==
        "test.yaml:4:16: key 'train.seq_len' (128) must be <= model.max_seq_len (64)");
  CHECK(load_error(d + "parallel:\n  sequence: 3\n") ==
        "test.yaml:4:13: key 'train.seq_len' (128) must be a multiple of parallel.sequence (3): "
        "nearest valid values are 126 and 129");
  CHECK(load_error(d + "train:\n  seq_len: 100\nparallel:\n  sequence: 8\n") ==
        "test.yaml:4:12: key 'train.seq_len' (100) must be a multiple of parallel.sequence (8): "
        "nearest valid values are 96 and 104");
  CHECK(load_error(d + "train:\n  seq_len: 4\nparallel:\n  sequence: 8\n") ==
        "test.yaml:6:13: key 'parallel.sequence' (8) must be <= train.seq_len (4): every rank "
        "needs at least one token");
  CHECK(load_error(d + "model:\n  n_head: 4\nparallel:\n  sequence: 8\n") ==
        "test.yaml:6:13: key 'parallel.sequence' (8) must be <= model.n_head (4): inside attention "
        "each of the P ranks computes at least one query head");
  // Uneven heads and GQA with fewer key/value heads than ranks are allowed (comm/ulysses.h).
  CHECK_NOTHROW(load_config_string(d + "model:\n  n_head: 6\n  n_embd: 96\nparallel:\n  sequence: 4\n", "t"));
  CHECK_NOTHROW(load_config_string(
      d + "model:\n  n_embd: 64\n  n_head: 8\n  n_kv_head: 2\nparallel:\n  sequence: 4\n", "t"));
  CHECK(load_error(d + "parallel:\n  sequence: 2\n  emulate_sequence: 4\n") ==
        "test.yaml:5:21: parallel.emulate_sequence (4) emulates a sequence-parallel run on one "
        "rank; it needs parallel.sequence 1, got 2");
  CHECK(load_error(d + "parallel:\n  emulate_sequence: 3\n") ==
        "test.yaml:4:21: key 'train.seq_len' (128) must be a multiple of parallel.emulate_sequence "
        "(3): nearest valid values are 126 and 129");
  CHECK(load_error(d + "train:\n  global_batch_tokens: 1000\n") ==
        "test.yaml:4:24: key 'train.global_batch_tokens' (1000) must be a multiple of "
        "micro_batch_size × seq_len = 4 × 128 = 512: nearest valid values are 512 and 1024");
  CHECK(load_error(d + "train:\n  global_batch_tokens: 100\n")
            .find("nearest valid values are 512") != std::string::npos);
  CHECK(load_error(d + "parallel:\n  backend: nccl\nruntime:\n  device: cpu\n") ==
        "test.yaml:4:12: parallel.backend 'nccl' moves device memory and needs runtime.device cuda "
        "(or auto), got 'cpu'");
  CHECK(load_error(d + "runtime:\n  device: cpu\n  attention: cudnn\n")
            .rfind("test.yaml:5:14: runtime.attention 'cudnn' runs on the GPU", 0) == 0);
  // runtime.offload: checkpoints needs full recompute and a CUDA device (auto is not enough)
  CHECK(load_error(d + "runtime:\n  device: cuda\n  offload: checkpoints\n") ==
        "test.yaml:5:12: runtime.offload 'checkpoints' moves the per-layer checkpoints of full recompute to host "
        "memory and needs runtime.recompute full, got 'none'");
  CHECK(load_error(d + "runtime:\n  device: cuda\n  recompute: selective\n  offload: checkpoints\n")
            .rfind("test.yaml:6:12: runtime.offload 'checkpoints' moves the per-layer checkpoints", 0) == 0);
  CHECK(load_error(d + "runtime:\n  recompute: full\n  offload: checkpoints\n") ==
        "test.yaml:5:12: runtime.offload 'checkpoints' copies between GPU and pinned host memory and needs "
        "runtime.device cuda, got 'auto'");
  CHECK(load_error(d + "runtime:\n  device: cpu\n  recompute: full\n  offload: checkpoints\n")
            .find("needs runtime.device cuda, got 'cpu'") != std::string::npos);
  {
    const Config c = load_config_string(d + "runtime:\n  device: cuda\n  recompute: full\n  offload: checkpoints\n",
                                        "t.yaml");
    CHECK(c.runtime.offload == "checkpoints");
    CHECK(load_config_string(d, "t.yaml").runtime.offload == "none");
    // --set reaches it too, and the check runs after the overrides
    CHECK(load_config_string(d, "t.yaml", {"runtime.device=cuda", "runtime.recompute=full",
                                           "runtime.offload=checkpoints"})
              .runtime.offload == "checkpoints");
    CHECK_THROWS_WITH(load_config_string(d, "t.yaml", {"runtime.device=cuda", "runtime.offload=checkpoints"}),
                      Catch::Contains("needs runtime.recompute full"));
  }
  // runtime.overlap_comm: a second CUDA stream, so device cuda (auto and cpu refused, naming both keys)
  CHECK(load_error(d + "runtime:\n  overlap_comm: true\n") ==
        "test.yaml:4:17: runtime.overlap_comm runs ZeRO's per-layer collectives on a second CUDA stream and needs "
        "runtime.device cuda, got 'auto'");
  CHECK(load_error(d + "runtime:\n  device: cpu\n  overlap_comm: true\n")
            .find("needs runtime.device cuda, got 'cpu'") != std::string::npos);
  {
    CHECK_FALSE(load_config_string(d, "t.yaml").runtime.overlap_comm);  // default false
    CHECK(load_config_string(d + "runtime:\n  device: cpu\n  overlap_comm: false\n", "t.yaml").runtime.device == "cpu");
    CHECK(load_config_string(d, "t.yaml", {"runtime.device=cuda", "runtime.overlap_comm=true"}).runtime.overlap_comm);
    CHECK_THROWS_WITH(load_config_string(d, "t.yaml", {"runtime.overlap_comm=true"}),
                      Catch::Contains("runtime.overlap_comm") && Catch::Contains("runtime.device"));
    CHECK_THROWS_WITH(load_config_string(d, "t.yaml", {"runtime.device=cpu", "runtime.overlap_comm=true"}),
                      Catch::Contains("got 'cpu'"));
  }
  // runtime.all_to_all_chunks: in [1, seq_len / P], naming the key and the two it depends on
  {
    CHECK(load_config_string(d, "t.yaml").runtime.all_to_all_chunks == 1);  // default 1
    const std::string sp = d + "train:\n  seq_len: 64\nparallel:\n  sequence: 4\n";  // 16 local tokens
    CHECK(load_config_string(sp + "runtime:\n  all_to_all_chunks: 16\n", "t.yaml").runtime.all_to_all_chunks == 16);
    CHECK_THROWS_WITH(load_config_string(sp + "runtime:\n  all_to_all_chunks: 17\n", "t.yaml"),
                      Catch::Contains("runtime.all_to_all_chunks") && Catch::Contains("train.seq_len") &&
                          Catch::Contains("parallel.sequence") && Catch::Contains("(17) must be <= the 16 local"));
    CHECK_THROWS_WITH(load_config_string(sp, "t.yaml", {"runtime.all_to_all_chunks=0"}),
                      Catch::Contains("runtime.all_to_all_chunks"));
    CHECK_THROWS_WITH(load_config_string(d + "train:\n  seq_len: 64\nparallel:\n  emulate_sequence: 4\n", "t.yaml",
                                         {"runtime.all_to_all_chunks=17"}),
                      Catch::Contains("parallel.emulate_sequence") && Catch::Contains("the 16 local tokens"));
    // P = 1: no all-to-all, so K > 1 would be ignored: refused (keys without effect, below)
    CHECK_THROWS_WITH(load_config_string(d, "t.yaml", {"runtime.all_to_all_chunks=1000"}),
                      Catch::Contains("key 'runtime.all_to_all_chunks' has no effect"));
  }
  CHECK(load_error(d + "checkpoint:\n  interval: 100\n") ==
        "test.yaml:4:13: key 'checkpoint.interval' (100) needs checkpoint.dir, the directory "
        "checkpoints are written to");
  CHECK(load_error(d + "checkpoint:\n  resume: auto\n")
            .rfind("test.yaml:4:11: checkpoint.resume 'auto' resumes from the newest", 0) == 0);
}

TEST_CASE("data files under the synthetic default: shards taken, or an error naming both keys", "[config][inert]") {
  // No --config: the embedded default says synthetic, the user names files and not the source.
  Config c = load_config("", {"data.train=my.bin", "data.val=my_val.bin"});
  CHECK(c.data.source == "shards");
  CHECK(c.data.train == std::vector<std::string>{"my.bin"});
  REQUIRE(c.notes.size() == 1);
  CHECK(c.notes[0] == "data.source: shards, since data.train is set (--set data.train=my.bin) and data.source was "
                      "not (the embedded default says synthetic)");
  // --print-config shows the choice as a comment, and its output reloads to the same config.
  const std::string yaml = to_yaml(c);
  CHECK(yaml.find("\n# note: data.source: shards, since data.train is set") != std::string::npos);
  require_same(load_config_string(yaml, "printed.yaml"), c);
  CHECK(load_config_string(yaml, "printed.yaml").notes.empty());
  // The embedded default's eval_interval has no validation files then: a default, so no error.
  CHECK(load_config("", {"data.train=my.bin"}).train.eval_interval == 50);
  CHECK(load_config("", {"data.train=my.bin"}).notes.size() == 1);
  // Without data.train there is nothing to decide: the default stays synthetic, no note.
  CHECK(load_config("").data.source == "synthetic");
  CHECK(load_config("").notes.empty());
  // data.val alone under the synthetic default: no files to train on, so an error.
  CHECK_THROWS_WITH(load_config("", {"data.val=v.bin"}),
                    Catch::Equals("--set data.val=v.bin: key 'data.val' has no effect, because data.source is "
                                  "'synthetic' (random tokens; no file is read): set data.source: shards and "
                                  "list data.train too, or drop data.val"));
  // The user said synthetic themselves (in their file, or by --set before the files): an error.
  CHECK(load_error(kSynthetic + "  train: [a.bin]\n") ==
        "test.yaml:3:10: key 'data.train' has no effect, because data.source is 'synthetic' (random tokens; no "
        "file is read): set data.source: shards, or drop data.train");
  CHECK(load_error(kSynthetic, {"data.train=a.bin"}) ==
        "--set data.train=a.bin: key 'data.train' has no effect, because data.source is 'synthetic' (random "
        "tokens; no file is read): set data.source: shards, or drop data.train");
  CHECK_THROWS_WITH(load_config("", {"data.source=synthetic", "data.train=a.bin"}),
                    Catch::Contains("key 'data.train' has no effect"));
  // A later --set of the source over a file's shards: the later word wins, with a note.
  Config later = load_config_string("data:\n  train: [a.bin]\n  val: [b.bin]\n  shuffle: true\n", "run.yaml",
                                    {"data.source=synthetic"});
  CHECK(later.data.source == "synthetic");
  REQUIRE(later.notes.size() == 3);
  CHECK(later.notes[0] == "run.yaml:2:10: key 'data.train' has no effect, because data.source is 'synthetic' "
                          "(random tokens; no file is read), set later by --set data.source=synthetic");
  CHECK(later.notes[1].rfind("run.yaml:3:8: key 'data.val' has no effect", 0) == 0);
  CHECK(later.notes[2].rfind("run.yaml:4:12: key 'data.shuffle' has no effect", 0) == 0);
  // and shards with files, the ordinary case, loads with no note
  CHECK(load_config_string("data:\n  train: [a.bin]\n", "t.yaml").notes.empty());
}

TEST_CASE("keys without effect: an error naming both keys and the fix", "[config][inert]") {
  const std::string d = kSynthetic;
  struct Row {
    std::string yaml;      // appended to d
    std::string message;   // the whole error
  };
  const std::vector<Row> rows = {
      {"model:\n  rope_theta: 5000\n",
       "test.yaml:4:15: key 'model.rope_theta' has no effect, because model.position_embedding is 'learned' (rope_theta "
       "is the rotary base): set model.position_embedding: rope, or drop model.rope_theta"},
      {"model:\n  init_std: 0.01\ncheckpoint:\n  init_from: g.bin\n",
       "test.yaml:4:13: key 'model.init_std' has no effect, because checkpoint.init_from is 'g.bin' (the weights come "
       "from that file): drop model.init_std, or drop checkpoint.init_from to initialise from the seed"},
      {"model:\n  init_std: 0.01\ncheckpoint:\n  resume: ck/step_1\n",
       "test.yaml:4:13: key 'model.init_std' has no effect, because checkpoint.resume is 'ck/step_1' (the weights come "
       "from that checkpoint): drop model.init_std, or use checkpoint.resume: auto"},
      {"train:\n  lr_schedule: constant\n  min_lr_ratio: 0.5\n",
       "test.yaml:5:17: key 'train.min_lr_ratio' has no effect, because train.lr_schedule is 'constant' (the learning "
       "rate never decays): set train.lr_schedule: cosine or linear, or drop train.min_lr_ratio"},
      {"train:\n  sample_temperature: 0.5\n",
       "test.yaml:4:23: key 'train.sample_temperature' has no effect, because train.sample_tokens is 0 (no sample is "
       "generated): set train.sample_tokens > 0, or drop train.sample_temperature"},
      {"train:\n  eval_steps: 0\n  eval_interval: 5\n",
       "test.yaml:5:18: key 'train.eval_interval' has no effect, because train.eval_steps is 0 (validation is off): "
       "set train.eval_steps > 0, or drop train.eval_interval"},
      {"  shuffle: true\n",
       "test.yaml:3:12: key 'data.shuffle' has no effect, because data.source is 'synthetic' (the tokens are random "
       "already): set data.source: shards, or drop data.shuffle"},
      {"  tokenizer: gpt2\n",
       "test.yaml:3:14: key 'data.tokenizer' has no effect, because train.sample_tokens is 0 (the tokenizer only "
       "decodes the sample printed at the end; token shards are already tokenized, see `ulysses prepare "
       "--tokenizer`): set train.sample_tokens > 0, or drop data.tokenizer"},
      {"  tokenizer_dir: tok\ntrain:\n  sample_tokens: 5\n",
       "test.yaml:3:18: key 'data.tokenizer_dir' has no effect, because data.tokenizer is 'byte' (only gpt2 reads "
       "files): set data.tokenizer: gpt2, or drop data.tokenizer_dir"},
      {"runtime:\n  device: cpu\n  attention: flash\n",
       "test.yaml:5:14: key 'runtime.attention' has no effect, because runtime.device is 'cpu' (the CPU runs its fp32 "
       "reference attention): drop runtime.attention, or set runtime.device: cuda"},
      {"runtime:\n  all_to_all_chunks: 4\n",
       "test.yaml:4:22: key 'runtime.all_to_all_chunks' has no effect, because parallel.sequence is 1 (no all-to-all "
       "runs without sequence parallelism): set parallel.sequence (or parallel.emulate_sequence) > 1, or drop "
       "runtime.all_to_all_chunks"},
      {"runtime:\n  debug_inject_nan_steps: 3\n",
       "test.yaml:4:27: key 'runtime.debug_inject_nan_steps' has no effect, because runtime.debug_inject_nan_step is "
       "0 (no NaN is injected): set runtime.debug_inject_nan_step, or drop runtime.debug_inject_nan_steps"},
      {"checkpoint:\n  keep_last: 9\n",
       "test.yaml:4:14: key 'checkpoint.keep_last' has no effect, because checkpoint.dir is empty (no checkpoint is "
       "written): set checkpoint.dir, or drop checkpoint.keep_last"},
      {"checkpoint:\n  dir: ck\n  resume: ck/step_1\n  init_from: g.bin\n",
       "test.yaml:6:14: key 'checkpoint.init_from' has no effect, because checkpoint.resume is 'ck/step_1' (the run "
       "continues from that checkpoint): drop checkpoint.init_from, or use checkpoint.resume: auto, which starts "
       "from init_from while checkpoint.dir holds no checkpoint yet"},
      {"logging:\n  level: warn\n  all_ranks: true\n",
       "test.yaml:5:14: key 'logging.all_ranks' has no effect, because logging.level is 'warn' (all_ranks concerns "
       "info lines and below; every rank prints warnings and errors): set logging.level: info, or drop "
       "logging.all_ranks"},
  };
  for (const Row& r : rows) {
    INFO(r.yaml);
    CHECK(load_error(d + r.yaml) == r.message);
  }
  // shards without validation files: the eval keys have nothing to evaluate
  CHECK(load_error("data:\n  train: [a.bin]\ntrain:\n  eval_interval: 10\n") ==
        "test.yaml:4:18: key 'train.eval_interval' has no effect, because data.val lists no validation shards (no "
        "validation pass runs): list validation shards in data.val, or drop train.eval_interval");
  CHECK_THROWS_WITH(load_config_string("data:\n  train: [a.bin]\ntrain:\n  eval_steps: 10\n", "t.yaml"),
                    Catch::Contains("key 'train.eval_steps' has no effect, because data.val lists no validation"));
  // eval_steps 0 (validation off) agrees with having no validation data: accepted
  CHECK_NOTHROW(load_config_string("data:\n  train: [a.bin]\ntrain:\n  eval_steps: 0\n", "t.yaml"));

  // The same keys where they do have an effect load fine.
  CHECK_NOTHROW(load_config_string(d + "model:\n  position_embedding: rope\n  rope_theta: 5000\n", "t"));
  CHECK_NOTHROW(load_config_string(d + "train:\n  lr_schedule: linear\n  min_lr_ratio: 0.5\n", "t"));
  CHECK_NOTHROW(load_config_string(d + "train:\n  sample_tokens: 4\n  sample_temperature: 0.5\n", "t"));
  CHECK_NOTHROW(load_config_string(d + "train:\n  eval_interval: 5\n  eval_steps: 2\n", "t"));  // synthetic val
  CHECK_NOTHROW(load_config_string(d + "runtime:\n  device: cuda\n  attention: flash\n", "t"));
  CHECK_NOTHROW(load_config_string(d + "runtime:\n  attention: flash\n", "t"));  // auto: decided at start-up
  CHECK_NOTHROW(load_config_string(d + "parallel:\n  sequence: 2\nruntime:\n  all_to_all_chunks: 4\n", "t"));
  CHECK_NOTHROW(load_config_string(d + "parallel:\n  emulate_sequence: 2\nruntime:\n  all_to_all_chunks: 4\n", "t"));
  CHECK_NOTHROW(load_config_string(d + "checkpoint:\n  dir: ck\n  resume: auto\n  init_from: g.bin\n", "t"));
  // A moot key left at its default value changes nothing, so it passes (print-config prints every key).
  CHECK_NOTHROW(load_config_string(d + "model:\n  rope_theta: 10000\ncheckpoint:\n  keep_last: 3\n", "t"));

  // A later --set that makes a file's key moot: a note, not an error; an earlier one: an error.
  Config c = load_config_string(d + "  tokenizer: gpt2\n  tokenizer_dir: tok\ntrain:\n  sample_tokens: 5\n", "run.yaml",
                                {"train.sample_tokens=0"});
  REQUIRE(c.notes.size() == 2);
  CHECK(c.notes[0] == "run.yaml:3:14: key 'data.tokenizer' has no effect, because train.sample_tokens is 0 (the "
                      "tokenizer only decodes the sample printed at the end; token shards are already tokenized, "
                      "see `ulysses prepare --tokenizer`), set later by --set train.sample_tokens=0");
  CHECK(c.notes[1].rfind("run.yaml:4:18: key 'data.tokenizer_dir' has no effect", 0) == 0);
  CHECK_THROWS_WITH(load_config_string(d, "run.yaml", {"train.sample_tokens=0", "train.sample_temperature=2"}),
                    Catch::Contains("--set train.sample_temperature=2: key 'train.sample_temperature' has no effect"));
  CHECK(load_config_string(d, "run.yaml", {"train.sample_temperature=2", "train.sample_tokens=0"}).notes.size() == 1);
}

TEST_CASE("inert_at_start: settings the device, backend or world size make moot", "[config][inert]") {
  const Config plain = load_config_string(kSynthetic, "t.yaml");
  CHECK(inert_at_start(plain, false, false, 1).empty());
  CHECK(inert_at_start(plain, true, true, 8).empty());
  const Config flash = load_config_string(kSynthetic + "runtime:\n  attention: flash\n", "t.yaml");
  CHECK(inert_at_start(flash, true, true, 1).empty());
  REQUIRE(inert_at_start(flash, false, false, 1).size() == 1);
  CHECK(inert_at_start(flash, false, false, 1)[0] ==
        "runtime.attention 'flash' has no effect: the job runs on the CPU (runtime.device auto), whose attention "
        "is the fp32 reference");
  const Config zero = load_config_string(kSynthetic + "parallel:\n  zero_stage: 2\n", "t.yaml");
  CHECK(inert_at_start(zero, false, false, 2).empty());
  REQUIRE(inert_at_start(zero, false, false, 1).size() == 1);
  CHECK(inert_at_start(zero, false, false, 1)[0] ==
        "parallel.zero_stage 2 saves no memory on 1 rank: each shard is the whole buffer");
  const Config overlap = load_config_string(
      kSynthetic + "parallel:\n  sequence: 2\nruntime:\n  device: cuda\n  overlap_comm: true\n  all_to_all_chunks: 2\n",
      "t.yaml");
  CHECK(inert_at_start(overlap, true, true, 2).empty());
  const std::vector<std::string> staged = inert_at_start(overlap, true, false, 2);
  REQUIRE(staged.size() == 2);
  CHECK(staged[0].rfind("runtime.overlap_comm has no effect on the staged MPI backend", 0) == 0);
  CHECK(staged[1].rfind("runtime.all_to_all_chunks 2 overlaps nothing on the staged MPI backend", 0) == 0);
}

TEST_CASE("--set overrides", "[config][set]") {
  Config c = load_config_string(kSynthetic + "train:\n  lr: 0.1\n", "t.yaml",
                                {"train.lr=3e-4", "model.n_layer=6", "data.source=shards", "data.train=[a.bin, b.bin]",
                                 "data.shuffle=true", "checkpoint.dir=", "train.seed=42",
                                 "data.val=*.bin", "runtime.device=cpu"});
  CHECK(c.train.lr == 3e-4);
  CHECK(c.model.n_layer == 6);
  CHECK(c.data.train == std::vector<std::string>{"a.bin", "b.bin"});
  CHECK(c.data.shuffle);
  CHECK(c.checkpoint.dir.empty());
  CHECK(c.train.seed == 42u);
  CHECK(c.data.val == std::vector<std::string>{"*.bin"});  // not YAML (an alias), taken as is
  CHECK(c.runtime.device == "cpu");
  // Later overrides win.
  CHECK(load_config_string(kSynthetic, "t.yaml", {"train.lr=1", "train.lr=2"}).train.lr == 2.0);
  // An override can satisfy a required key the file leaves out.
  CHECK(load_config_string("", "t.yaml", {"data.source=synthetic"}).data.source == "synthetic");

  CHECK(load_error(kSynthetic, {"train.lr=-1"}) ==
        "--set train.lr=-1: key 'train.lr': expected a positive number, got '-1'");
  CHECK(load_error(kSynthetic, {"train.lrr=1"}) ==
        "--set train.lrr=1: unknown key 'train.lrr' (did you mean 'train.lr'?)");
  CHECK(load_error(kSynthetic, {"trian.lr=1"}) ==
        "--set trian.lr=1: unknown key 'trian.lr' (did you mean 'train.lr'?)");
  CHECK(load_error(kSynthetic, {"lr=1"}) == "--set lr=1: unknown key 'lr' (did you mean 'train.lr'?)");
  CHECK(load_error(kSynthetic, {"train.lr"}) ==
        "--set train.lr: expected key.path=value, e.g. --set train.lr=3e-4");
  CHECK(load_error(kSynthetic, {"model=3"}).rfind("--set model=3: key 'model' is a group; set one of "
                                                  "its keys (n_layer, ",
                                                  0) == 0);
  CHECK(load_error(kSynthetic, {"model.n_layer=[1, 2"}).rfind(
            "--set model.n_layer=[1, 2: key 'model.n_layer': invalid YAML value", 0) == 0);
  CHECK(load_error(kSynthetic, {"model.position_embedding=rpoe"}) ==
        "--set model.position_embedding=rpoe: key 'model.position_embedding': expected one of "
        "learned, rope, got 'rpoe' (did you mean 'rope'?)");
  // A conflict that an override creates is reported at the override.
  CHECK(load_error(kSynthetic, {"parallel.sequence=3"}) ==
        "--set parallel.sequence=3: key 'train.seq_len' (128) must be a multiple of "
        "parallel.sequence (3): nearest valid values are 126 and 129");
}

TEST_CASE("validate_for_world", "[config][world]") {
  Config c = load_config_string(kSynthetic + "model:\n  n_head: 8\n  n_embd: 128\nparallel:\n  sequence: 4\n",
                                "w.yaml");
  CHECK_NOTHROW(validate_for_world(c, 4));
  CHECK_NOTHROW(validate_for_world(c, 8));
  CHECK(world_error(c, 6) ==
        "w.yaml: key 'parallel.sequence' (4) must divide the world size (6 ranks): valid values for "
        "this world and model are 1, 2");
  CHECK(world_error(c, 2).find("valid values for this world and model are 1, 2") != std::string::npos);

  // micro-step over all ranks: 4 sequences × 128 tokens × (8 / 4) data-parallel groups = 1024.
  c.train.global_batch_tokens = 3072;
  CHECK_NOTHROW(validate_for_world(c, 8));
  c.train.global_batch_tokens = 1536;
  CHECK_NOTHROW(validate_for_world(c, 4));  // 512 per micro-step
  CHECK(world_error(c, 8) ==
        "w.yaml: key 'train.global_batch_tokens' (1536) must be a multiple of the tokens in one "
        "micro-step over all ranks, micro_batch_size × seq_len × (world size / parallel.sequence) "
        "= 4 × 128 × (8 / 4) = 1024: nearest valid values are 1024 and 2048");
  c.train.global_batch_tokens = 512;
  CHECK(world_error(c, 8).find("nearest valid values are 1024") != std::string::npos);
}

TEST_CASE("to_yaml round trips exactly", "[config][yaml]") {
  Config c = load_config_string(kEveryKey, "every.yaml");
  // Values whose shortest decimal form is long, and strings YAML would misread unquoted.
  c.train.lr = 0.1 + 0.2;
  c.train.beta1 = 1.0 / 3.0;
  c.train.eps = 5e-324;  // the smallest denormal
  c.model.init_std = 0.02 * (1.0 + 1e-15);
  c.runtime.comm_timeout = 1e300;
  c.checkpoint.dir = "dir with: colon # hash";
  c.checkpoint.init_from = "";  // init_std is set, and init_from would make it moot
  c.data.tokenizer_dir = "yes";
  c.checkpoint.export_llmc = "line\nbreak \"quoted\" back\\slash \t tab";
  c.logging.metrics_file = "12345";
  c.data.train = {"", "- dash", "[bracket]", "ünïcødé"};
  c.data.val = {};
  c.train.eval_interval = 0;  // without data.val the eval keys are moot, so at their defaults
  c.train.eval_steps = 4;
  std::string text = to_yaml(c);
  Config back = load_config_string(text, "every.yaml");
  require_same(c, back);
  CHECK(to_yaml(back) == text);

  // The text names every key of the table once.
  CHECK(text.find("  rope_theta: 500000\n") != std::string::npos);
  CHECK(text.find("  val: []\n") != std::string::npos);
}

TEST_CASE("every file in configs/ loads and round trips", "[config][yaml]") {
  int count = 0;
  for (const auto& entry : fs::recursive_directory_iterator(ULYSSES_SOURCE_DIR "/configs")) {
    if (entry.path().extension() != ".yaml") continue;
    INFO(entry.path().string());
    Config c = load_config(entry.path().string());
    Config back = load_config_string(to_yaml(c), c.source);
    require_same(c, back);
    count++;
  }
  CHECK(count >= 5);  // tiny, gpt2-124m and the three paper configs

  // The paper configs fit the world sizes they are written for.
  Config b13 = load_config(ULYSSES_SOURCE_DIR "/configs/paper/gpt-1.3b-256k.yaml");
  CHECK(b13.model.n_layer == 24);
  CHECK(b13.train.seq_len == 262144);
  CHECK_NOTHROW(validate_for_world(b13, 8));
  Config b7 = load_config(ULYSSES_SOURCE_DIR "/configs/paper/gpt-7b.yaml");
  CHECK(b7.model.n_embd == 4096);
  CHECK_NOTHROW(validate_for_world(b7, 32));
  Config b30 = load_config(ULYSSES_SOURCE_DIR "/configs/paper/gpt-30b.yaml");
  CHECK(b30.model.n_head == 56);
  CHECK_NOTHROW(validate_for_world(b30, 64));
  Config g2 = load_config(ULYSSES_SOURCE_DIR "/configs/gpt2-124m.yaml");
  CHECK(g2.model.vocab_size == 50257);
  for (int world : {1, 2, 4, 8, 16, 32}) CHECK_NOTHROW(validate_for_world(g2, world));
}

TEST_CASE("docs/configs.md documents every key", "[config][docs]") {
  std::ifstream in(ULYSSES_SOURCE_DIR "/docs/configs.md");
  REQUIRE(in);
  std::string docs((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Walk the keys as to_yaml prints them: "group:" lines, then "  leaf: value" lines. Each leaf
  // must have a table row "| `leaf` |" inside its group's "### group" section.
  std::istringstream yaml(to_yaml(Config{}));
  std::string line, section;
  int keys = 0;
  while (std::getline(yaml, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line[0] != ' ') {
      std::string group = line.substr(0, line.find(':'));
      size_t begin = docs.find("\n### " + group + "\n");
      INFO("group " << group);
      REQUIRE(begin != std::string::npos);
      size_t end = docs.find("\n## ", begin + 1);
      size_t next = docs.find("\n### ", begin + 1);
      section = docs.substr(begin, std::min(end, next) - begin);
      continue;
    }
    std::string leaf = line.substr(2, line.find(':') - 2);
    INFO("key " << leaf);
    CHECK(section.find("| `" + leaf + "` |") != std::string::npos);
    keys++;
  }
  CHECK(keys >= 50);
}

TEST_CASE("config files: missing, directory", "[config][errors]") {
  std::string missing = "/nonexistent/dir/cfg.yaml";
  try {
    load_config(missing);
    FAIL("no error");
  } catch (const UserError& e) {
    CHECK(std::string(e.what()).rfind(missing + ": cannot open the config file", 0) == 0);
  }
  try {
    load_config(ULYSSES_SOURCE_DIR "/configs");
    FAIL("no error");
  } catch (const UserError& e) {
    CHECK(std::string(e.what()).find("is a directory") != std::string::npos);
  }
  // Errors in a real file carry its path.
  fs::path tmp = fs::temp_directory_path() / "ulysses_test_config_bad.yaml";
  std::ofstream(tmp) << kSynthetic << "train:\n  lr: -1\n";
  try {
    load_config(tmp.string());
    FAIL("no error");
  } catch (const UserError& e) {
    CHECK(std::string(e.what()) ==
          tmp.string() + ":4:7: key 'train.lr': expected a positive number, got '-1'");
  }
  fs::remove(tmp);
}

TEST_CASE("init_logging", "[log]") {
  for (const char* level : {"trace", "debug", "info", "warn", "error"})
    CHECK_NOTHROW(init_logging(0, level, false));
  try {
    init_logging(0, "verbose", false);
    FAIL("no error");
  } catch (const UserError& e) {
    CHECK(std::string(e.what()) ==
          "log level 'verbose' is not one of trace, debug, info, warn, error");
  }
  init_logging(1, "debug", false);
  CHECK(spdlog::get_level() == spdlog::level::warn);  // other ranks: warnings and errors only
  init_logging(1, "debug", true);
  CHECK(spdlog::get_level() == spdlog::level::debug);
  init_logging(0, "debug", false);
  CHECK(spdlog::get_level() == spdlog::level::debug);
  init_logging(3, "error", false);
  CHECK(spdlog::get_level() == spdlog::level::err);
  init_logging(0, "info", false);
}
