// The `ulysses` executable: parses the command line (CLI11) and runs one subcommand.
//
//   ulysses train   [--config PATH] [--set key.path=value]... [--print-config] [--log-level L]
//   ulysses check   (the same options)  brings up the process groups and tests every collective
//   ulysses dump    (the same options) --out FILE.safetensors  the first micro-batch's logits, loss
//                   and gradients from the initial weights (core/trainer.h); no training
//   ulysses prepare INPUT... --out DIR [--name N] [--tokenizer byte|gpt2] [--tokenizer-dir D]
//                   [--val-fraction F] [--shard-tokens K] [--log-level L]
//   ulysses bench    (the config options) [--warmup W] [--repeat R] [--csv FILE]
//   ulysses estimate (the config options) [--gpus N] [--gpu-memory 80GB]
//   ulysses --version
//
// Exit codes: 0 success; 2 bad input (a config, command-line or data error: a UserError, printed
// as `error: <message>` without a stack trace); 1 an internal error (a bug or a system failure).
//
// Every rank parses the same command line and loads the same config, so errors there are seen by
// every rank alike: the lowest failing rank (rank 0 in practice) prints the message once and all
// ranks return 2 together. An error inside a subcommand may be seen by one rank only; that rank
// prints it and ends the whole job with MPI_Abort, so no rank waits forever in a collective.
// MPI's C API only: the deprecated C++ bindings would need libmpi_cxx at link time.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <exception>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "comm/bootstrap.h"
#include "comm/comm_check.h"
#include "core/config.h"
#include "core/base/error.h"
#include "core/base/log.h"
#include "core/memory_estimate.h"
#include "core/bench.h"
#include "core/prepare.h"
#include "core/trainer.h"

namespace {

using namespace ulysses;

constexpr const char* kVersion = "0.1.0";
constexpr int kExitUserError = 2;
constexpr int kExitInternalError = 1;

std::string version_text() {
#ifdef ULYSSES_CUDA
  const char* cuda = "yes";
#else
  const char* cuda = "no, CPU-only build";
#endif
  return fmt::format("ulysses {} (CUDA: {})", kVersion, cuda);
}

// The options every config-driven subcommand (train, check) takes.
struct ConfigOptions {
  std::string path;                    // empty: the embedded default (configs/tiny.yaml)
  std::vector<std::string> overrides;  // --set key.path=value, in order
  bool print_config = false;
  std::string log_level;               // empty: logging.level from the config
  bool any_world = false;              // estimate: the config describes a world other than this one
};

const std::vector<std::string> kLogLevels = {"trace", "debug", "info", "warn", "error"};

void add_config_options(CLI::App* cmd, ConfigOptions& o) {
  cmd->add_option("--config", o.path, "YAML config file (default: the embedded tiny config)");
  cmd->add_option("--set", o.overrides,
                  "Override one key, e.g. --set train.lr=3e-4 or --set data.train=[a.bin,b.bin] "
                  "(repeatable)")
      ->allow_extra_args(false);  // one key=value per --set
  cmd->add_flag("--print-config", o.print_config,
                "Print the fully resolved config as YAML (rank 0) and exit");
  cmd->add_option("--log-level", o.log_level, "Override logging.level")
      ->check(CLI::IsMember(kLogLevels));
}

void print_error(const std::string& message) { fmt::print(stderr, "error: {}\n", message); }

// Loads and validates the config on every rank and agrees on the outcome: when any rank fails,
// the lowest failing rank prints its message and every rank gets std::nullopt (exit 2).
std::optional<Config> load_config_everywhere(const ConfigOptions& o, const MpiRuntime& mpi) {
  std::optional<Config> cfg;
  std::string error;
  try {
    std::vector<std::string> overrides = o.overrides;
    if (!o.log_level.empty()) overrides.push_back("logging.level=" + o.log_level);
    cfg = load_config(o.path, overrides);
    // --print-config shows a config for any world (a 64-GPU config prints on a laptop).
    if (!o.print_config && !o.any_world) validate_for_world(*cfg, mpi.world_size);
    init_logging(mpi.world_rank, cfg->logging.level, cfg->logging.all_ranks);
  } catch (const UserError& e) {
    error = e.what();
    cfg.reset();
  }
  int my_failure = error.empty() ? mpi.world_size : mpi.world_rank;
  int first_failure = mpi.world_size;
  MPI_Allreduce(&my_failure, &first_failure, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (first_failure == mpi.world_size) return cfg;
  if (first_failure == mpi.world_rank) print_error(error);
  return std::nullopt;
}

// A UserError from inside a subcommand: possibly this rank's alone, so end the whole job.
int fail_on_this_rank(const MpiRuntime& mpi, const std::string& message, int code) {
  if (mpi.world_size == 1) {
    print_error(message);
    return code;
  }
  print_error(fmt::format("(rank {}) {}", mpi.world_rank, message));
  std::fflush(stderr);
  mpi.abort(code);
}

int run_config_subcommand(const std::string& name, const ConfigOptions& o, MpiRuntime& mpi,
                          const BenchOptions& bench = {}, const EstimateOptions& estimate = {},
                          const std::string& dump_out = "") {
  std::optional<Config> cfg = load_config_everywhere(o, mpi);
  if (!cfg) return kExitUserError;
  if (o.print_config) {
    if (mpi.world_rank == 0) fmt::print("{}", to_yaml(*cfg));  // the notes are comments there
    return 0;
  }
  if (mpi.world_rank == 0)
    for (const std::string& note : cfg->notes) spdlog::warn("config: {}", note);
  try {
    if (name == "train") return run_train(*cfg, mpi);
    if (name == "check")
      return run_comm_check({cfg->runtime.device, cfg->parallel.backend, cfg->parallel.sequence}, mpi);
    if (name == "dump") return run_train(*cfg, mpi, dump_out);
    if (name == "bench") return run_bench(*cfg, mpi, bench);
    if (name == "estimate") return run_estimate(*cfg, mpi, estimate);
  } catch (const AllRanksUserError& e) {
    if (mpi.world_rank == 0) print_error(e.what());
    return kExitUserError;
  } catch (const UserError& e) {
    return fail_on_this_rank(mpi, e.what(), kExitUserError);
  }
  ULYSSES_ASSERT(false, "unhandled subcommand '{}'", name);
  return kExitInternalError;
}

// Preparing data is one process's job: rank 0 writes the shards, the others wait for its result.
int run_prepare_subcommand(const PrepareOptions& opts, const std::string& log_level,
                           const MpiRuntime& mpi) {
  int code = 0;
  if (mpi.world_rank == 0) {
    try {
      init_logging(mpi.world_rank, log_level, false);
      code = run_prepare(opts);
    } catch (const UserError& e) {
      print_error(e.what());
      code = kExitUserError;
    }
  }
  MPI_Bcast(&code, 1, MPI_INT, 0, MPI_COMM_WORLD);
  return code;
}

// Every subcommand's options, filled by CLI11 when the command line is parsed, and the
// subcommands themselves (to ask which one was given).
struct Commands {
  ConfigOptions train, check, dump, bench, estimate;
  std::string dump_out;
  BenchOptions bench_extra;
  EstimateOptions estimate_extra;
  PrepareOptions prepare;
  std::string prepare_log_level = "info";
  CLI::App *train_cmd = nullptr, *check_cmd = nullptr, *dump_cmd = nullptr, *bench_cmd = nullptr,
           *estimate_cmd = nullptr, *prepare_cmd = nullptr;
};

// train, check and dump: a config, and for dump the file to write.
void add_model_commands(CLI::App& app, Commands& c) {
  c.train_cmd = app.add_subcommand("train", "Train a GPT model (the default config: a tiny model)");
  add_config_options(c.train_cmd, c.train);
  c.check_cmd = app.add_subcommand(
      "check", "Bring up the process groups of the configured layout and test every collective");
  add_config_options(c.check_cmd, c.check);
  c.dump_cmd = app.add_subcommand(
      "dump", "Write the first training micro-batch's logits, loss and gradients (from the initial weights) to a "
              "safetensors file, without training");
  add_config_options(c.dump_cmd, c.dump);
  c.dump_cmd->add_option("--out", c.dump_out, "The safetensors file to write (rank 0)")->required();
}

void add_prepare_command(CLI::App& app, Commands& c) {
  PrepareOptions& o = c.prepare;
  CLI::App* prepare = c.prepare_cmd =
      app.add_subcommand("prepare", "Tokenize text files into llm.c token shards (train and val)");
  prepare->add_option("inputs", o.inputs, "Text files, concatenated in order")->required();
  prepare->add_option("--out", o.output_dir, "Output directory")->required();
  prepare->add_option("--name", o.name, "Shard name prefix: <name>_train_000000.bin, ...")->capture_default_str();
  prepare->add_option("--tokenizer", o.tokenizer, "byte (vocabulary 256) or gpt2")
      ->check(CLI::IsMember({"byte", "gpt2"}))
      ->capture_default_str();
  prepare->add_option("--tokenizer-dir", o.tokenizer_dir, "gpt2: directory with encoder.json and vocab.bpe");
  prepare->add_option("--val-fraction", o.val_fraction, "Fraction of the tokens (the last ones) that go to the val split")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  prepare->add_option("--shard-tokens", o.shard_tokens, "Tokens per shard file")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  prepare->add_option("--log-level", c.prepare_log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember(kLogLevels))
      ->capture_default_str();
}

// bench and estimate: a config plus their own options.
void add_measure_commands(CLI::App& app, Commands& c) {
  BenchOptions& bench = c.bench_extra;
  c.bench_cmd = app.add_subcommand(
      "bench", "Time one training step of the configured model on random tokens (forward, backward, all-reduce, "
               "optimizer); the data and checkpoint keys are not read");
  add_config_options(c.bench_cmd, c.bench);
  c.bench_cmd->add_option("--warmup", bench.warmup, "Untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  c.bench_cmd->add_option("--repeat", bench.repeat, "Timed steps (the median is reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.bench_cmd->add_option("--csv", bench.csv, "Append one row of results to this CSV file (rank 0)");

  c.estimate.any_world = true;
  c.estimate_cmd = app.add_subcommand(
      "estimate", "Per-rank memory of the configured run (CPU fp32 and CUDA bf16) and the longest sequence that fits");
  add_config_options(c.estimate_cmd, c.estimate);
  c.estimate_cmd->add_option("--gpus", c.estimate_extra.gpus, "World size (default: parallel.sequence)")
      ->check(CLI::PositiveNumber);
  c.estimate_cmd->add_option("--gpu-memory", c.estimate_extra.gpu_memory, "Memory budget per rank, e.g. 80GB or 141GiB")
      ->capture_default_str();
}

// A mistyped subcommand ("ulysses trian") would otherwise only read "A subcommand is required".
// Returns false (after rank 0 said so) when argv[1] names none.
bool known_subcommand(CLI::App& app, int argc, char** argv, const MpiRuntime& mpi) {
  if (argc <= 1 || argv[1][0] == '-') return true;
  std::string names;
  bool known = false;
  for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    known = known || sub->get_name() == argv[1];
    names += (names.empty() ? "" : ", ") + sub->get_name();
  }
  if (!known && mpi.world_rank == 0)
    print_error(fmt::format("unknown subcommand '{}': expected one of {}", argv[1], names));
  return known;
}

int run(int argc, char** argv, MpiRuntime& mpi) {
  CLI::App app{"ulysses: GPT training on long sequences with DeepSpeed-Ulysses sequence "
               "parallelism",
               "ulysses"};
  app.set_version_flag("--version", version_text());
  app.require_subcommand(1);
  Commands c;
  add_model_commands(app, c);
  add_prepare_command(app, c);
  add_measure_commands(app, c);
  // Still to come, each as its own subcommand here (no placeholders are registered until then):
  //   inspect   print a checkpoint's or a token shard's header and statistics

  if (!known_subcommand(app, argc, argv, mpi)) return kExitUserError;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank sees the same command line: rank 0 speaks for all.
    std::ostringstream quiet;
    int code = mpi.world_rank == 0 ? app.exit(e) : app.exit(e, quiet, quiet);
    return code == 0 ? 0 : kExitUserError;
  }

  if (c.train_cmd->parsed()) return run_config_subcommand("train", c.train, mpi);
  if (c.check_cmd->parsed()) return run_config_subcommand("check", c.check, mpi);
  if (c.dump_cmd->parsed()) return run_config_subcommand("dump", c.dump, mpi, {}, {}, c.dump_out);
  if (c.bench_cmd->parsed()) return run_config_subcommand("bench", c.bench, mpi, c.bench_extra);
  if (c.estimate_cmd->parsed()) return run_config_subcommand("estimate", c.estimate, mpi, {}, c.estimate_extra);
  if (c.prepare_cmd->parsed()) return run_prepare_subcommand(c.prepare, c.prepare_log_level, mpi);
  ULYSSES_ASSERT(false, "CLI11 accepted the command line but no subcommand was parsed");
  return kExitInternalError;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<ulysses::MpiRuntime> mpi;
  try {
    mpi.emplace(&argc, &argv);
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: cannot start MPI: {}\n", e.what());
    return kExitInternalError;
  }
  try {
    return run(argc, argv, *mpi);
  } catch (const ulysses::UserError& e) {
    return fail_on_this_rank(*mpi, e.what(), kExitUserError);
  } catch (const std::exception& e) {
    return fail_on_this_rank(*mpi, fmt::format("internal error: {}", e.what()), kExitInternalError);
  }
}
