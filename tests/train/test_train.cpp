// End-to-end tests of `ulysses train` (run in-process through run_train): exact resume from a
// checkpoint, validation loss going down on a text made here, llm.c export, `ulysses dump` and
// the Hugging Face export, and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "comm/bootstrap.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/data.h"
#include "core/base/error.h"
#include "core/gpt.h"
#include "core/hf.h"
#include "core/llmc.h"
#include "core/trainer.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace ulysses;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("ulysses_test_train_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

Config tiny_config(const std::vector<std::string>& extra) {
  std::vector<std::string> sets = {"model.n_layer=2",         "model.n_embd=32",    "model.n_head=4",
                                   "model.max_seq_len=64",    "train.seq_len=32",   "train.micro_batch_size=2",
                                   "train.max_steps=8",       "train.warmup_steps=2", "data.source=synthetic",
                                   "runtime.threads=1",       "logging.level=warn"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

int run(const Config& cfg, const std::string& dump = "") {
  int argc = 0;
  char** argv = nullptr;
  MpiRuntime mpi(&argc, &argv);
  return run_train(cfg, mpi, dump);
}

using ulysses::test::field_values;  // tests/test_util.h

}  // namespace

TEST_CASE("resuming from a checkpoint continues bit for bit", "[train]") {
  const fs::path dir = fresh_dir("resume");
  const std::string ckpt = (dir / "ckpt").string();
  // a shuffled token shard (synthetic tokens have no order to shuffle), so the data position and
  // the epoch's permutation both carry over
  std::mt19937 rng(11);
  std::vector<uint16_t> tokens(20000);
  for (uint16_t& t : tokens) t = uint16_t(rng() % 256);
  write_token_shard((dir / "train.bin").string(), tokens);
  const std::string shards = "data.train=[" + (dir / "train.bin").string() + "]";
  // uninterrupted: 8 steps, checkpoints every 4
  REQUIRE(run(tiny_config({"checkpoint.dir=" + ckpt, "checkpoint.interval=4", "checkpoint.keep_last=10",
                           "logging.metrics_file=" + (dir / "full.jsonl").string(), "data.source=shards", shards,
                           "data.shuffle=true"})) == 0);
  REQUIRE(fs::exists(dir / "ckpt" / "step_00000004" / "manifest.yaml"));
  REQUIRE(verify_checkpoint((dir / "ckpt" / "step_00000004").string()).empty());
  // resumed at step 4
  REQUIRE(run(tiny_config({"checkpoint.resume=" + (dir / "ckpt" / "step_00000004").string(),
                           "logging.metrics_file=" + (dir / "resumed.jsonl").string(), "data.source=shards", shards,
                           "data.shuffle=true"})) == 0);
  const auto full = field_values(dir / "full.jsonl", "loss");
  const auto resumed = field_values(dir / "resumed.jsonl", "loss");
  REQUIRE(full.size() == 8);
  REQUIRE(resumed.size() == 4);
  for (size_t i = 0; i < 4; ++i) CHECK(resumed[i] == full[4 + i]);
  fs::remove_all(dir);
}

TEST_CASE("resume auto skips a damaged newest checkpoint", "[train]") {
  const fs::path dir = fresh_dir("auto");
  const std::string ckpt = (dir / "ckpt").string();
  REQUIRE(run(tiny_config({"checkpoint.dir=" + ckpt, "checkpoint.interval=2", "train.max_steps=4"})) == 0);
  // flip a byte of the newest checkpoint's weights: its checksum no longer matches
  const fs::path model = dir / "ckpt" / "step_00000004" / "model.bin";
  {
    std::fstream f(model, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x7f');
  }
  CHECK_THAT(verify_checkpoint((dir / "ckpt" / "step_00000004").string()), Catch::Contains("checksum mismatch"));
  const auto latest = find_latest_checkpoint(ckpt);
  REQUIRE(latest.has_value());
  CHECK(fs::path(*latest).filename() == "step_00000002");
  // an explicit resume from the damaged one is refused with the reason
  CHECK_THROWS_WITH(run(tiny_config({"checkpoint.resume=" + (dir / "ckpt" / "step_00000004").string()})),
                    Catch::Contains("checksum mismatch"));
  // a half-written one (no manifest) is never picked
  fs::create_directories(dir / "ckpt" / "step_00000009");
  CHECK(fs::path(*find_latest_checkpoint(ckpt)).filename() == "step_00000002");
  fs::remove_all(dir);
}

TEST_CASE("training on a small text lowers the validation loss", "[train]") {
  const fs::path dir = fresh_dir("text");
  // a text with structure to learn: sentences from a small grammar
  std::mt19937 rng(5);
  const char* subjects[] = {"the cat", "a dog", "the old king", "my friend", "a bird"};
  const char* verbs[] = {"sees", "likes", "follows", "finds", "hears"};
  const char* objects[] = {"the moon.", "a red ball.", "the river.", "his shadow.", "the sea."};
  std::string text;
  while (text.size() < 60000)
    text += std::string(subjects[rng() % 5]) + " " + verbs[rng() % 5] + " " + objects[rng() % 5] + "\n";
  std::vector<uint16_t> tokens(text.begin(), text.end());
  const size_t split = tokens.size() * 9 / 10;
  write_token_shard((dir / "train.bin").string(), std::vector<uint16_t>(tokens.begin(), tokens.begin() + long(split)));
  write_token_shard((dir / "val.bin").string(), std::vector<uint16_t>(tokens.begin() + long(split), tokens.end()));
  REQUIRE(run(tiny_config({"data.source=shards", "data.train=[" + (dir / "train.bin").string() + "]",
                           "data.val=[" + (dir / "val.bin").string() + "]", "train.max_steps=100",
                           "train.eval_interval=20", "train.lr=3e-3", "model.vocab_size=256",
                           "logging.metrics_file=" + (dir / "m.jsonl").string(),
                           "checkpoint.export_llmc=" + (dir / "model_llmc.bin").string(),
                           "checkpoint.dir=" + (dir / "ckpt").string()})) == 0);
  const auto val = field_values(dir / "m.jsonl", "val_loss");
  REQUIRE(val.size() == 5);
  const double first = std::stod(val.front()), last = std::stod(val.back());
  INFO("validation loss " << first << " -> " << last);
  CHECK(last < first - 0.5);            // still improving between the first and last evaluation
  CHECK(last < 0.45 * std::log(256.0));  // far below the untrained model's ln(256) = 5.55

  // the llm.c export holds exactly the final weights
  const Config cfg = tiny_config({"model.vocab_size=256"});
  const GPTShape shape = GPTShape::from(cfg.model);
  const int64_t n = num_parameters(shape);
  std::vector<float> exported(static_cast<size_t>(n)), saved(static_cast<size_t>(n));
  read_llmc_checkpoint((dir / "model_llmc.bin").string(), llmc_header_for(cfg.model), exported.data(), size_t(n));
  load_checkpoint((dir / "ckpt" / "step_00000100").string(), shape, saved.data(), nullptr, nullptr, n);
  CHECK(exported == saved);
  fs::remove_all(dir);
}

TEST_CASE("bad training input is a clear error", "[train]") {
  const fs::path dir = fresh_dir("bad");
  // a checkpoint of another model shape
  REQUIRE(run(tiny_config({"checkpoint.dir=" + (dir / "ckpt").string(), "train.max_steps=1"})) == 0);
  CHECK_THROWS_WITH(run(tiny_config({"checkpoint.resume=" + (dir / "ckpt" / "step_00000001").string(),
                                     "model.n_embd=64"})),
                    Catch::Contains("model.n_embd is 32 in the checkpoint, the config says 64"));
  // an llm.c file that is not one
  std::ofstream(dir / "junk.bin") << "not a checkpoint";
  CHECK_THROWS_AS(run(tiny_config({"checkpoint.init_from=" + (dir / "junk.bin").string()})), UserError);
  // rotary models cannot be exported to llm.c: refused before training starts
  CHECK_THROWS_WITH(run(tiny_config({"model.position_embedding=rope",
                                     "checkpoint.export_llmc=" + (dir / "x.bin").string()})),
                    Catch::Contains("learned positions only"));
  fs::remove_all(dir);
}

TEST_CASE("ulysses dump: the logits give the loss, the gradients the first step's norm; HF export round trip", "[train][hf]") {
  const fs::path dir = fresh_dir("dump");
  const std::string metrics = (dir / "m.jsonl").string(), dump = (dir / "d.safetensors").string();
  // one training step from the seed, with its loss and gradient norm in the metrics, and an HF export
  REQUIRE(run(tiny_config({"train.max_steps=1", "logging.metrics_file=" + metrics,
                           "checkpoint.export_hf=" + (dir / "hf").string()})) == 0);
  REQUIRE(run(tiny_config({}), dump) == 0);
  const double loss = std::stod(field_values(metrics, "loss").at(0));
  const double norm = std::stod(field_values(metrics, "grad_norm").at(0));
  SafetensorsReader r(dump);
  const int B = 2, N = 32, V = 256;
  CHECK(std::abs(double(r.read_f32("loss", {})[0]) - loss) <= 1e-6 * loss);
  // the mean cross-entropy of the dumped logits at the dumped targets is the loss
  const std::vector<float> logits = r.read_f32("logits", {B, N, V}), targets = r.read_f32("targets", {B, N});
  double ce = 0;
  for (size_t i = 0; i < size_t(B * N); ++i) {
    const float* row = logits.data() + i * size_t(V);
    double mx = row[0], sum = 0;
    for (int v = 0; v < V; ++v) mx = std::max(mx, double(row[v]));
    for (int v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
    ce += std::log(sum) + mx - double(row[size_t(targets[i])]);
  }
  CHECK(std::abs(ce / (B * N) - loss) <= 1e-5 * loss);
  // every parameter's gradient is there under its HF name; together they have the step's norm
  double squares = 0;
  size_t grads = 0;
  for (const SafetensorsEntry& e : r.entries())
    if (e.name.rfind("grad.", 0) == 0) {
      ++grads;
      for (float g : r.read_f32(e.name, e.shape)) squares += double(g) * double(g);
    }
  CHECK(grads == 2 + 12 * 2 + 2);
  CHECK(r.find("grad.transformer.h.1.mlp.c_proj.weight")->shape == std::vector<int64_t>{128, 32});
  CHECK(std::abs(std::sqrt(squares) - norm) <= 1e-5 * norm);
  // from the HF export (the weights after that one step on this same batch) the batch's loss is lower
  REQUIRE(run(tiny_config({"checkpoint.init_from=" + (dir / "hf").string()}), dump) == 0);
  const double loss_after = SafetensorsReader(dump).read_f32("loss", {})[0];
  CHECK(loss_after < loss - 1e-3);
  fs::remove_all(dir);
}
