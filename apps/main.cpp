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

int run(int argc, char** argv, MpiRuntime& mpi) {
  CLI::App app{"ulysses: GPT training on long sequences with DeepSpeed-Ulysses sequence "
               "parallelism",
               "ulysses"};
  app.set_version_flag("--version", version_text());
  app.require_subcommand(1);

  ConfigOptions train_opts;
  CLI::App* train = app.add_subcommand("train", "Train a GPT model (the default config: a tiny model)");
  add_config_options(train, train_opts);

  ConfigOptions check_opts;
  CLI::App* check = app.add_subcommand(
      "check", "Bring up the process groups of the configured layout and test every collective");
  add_config_options(check, check_opts);

  ConfigOptions dump_opts;
  std::string dump_out;
  CLI::App* dump = app.add_subcommand(
      "dump", "Write the first training micro-batch's logits, loss and gradients (from the initial weights) to a "
              "safetensors file, without training");
  add_config_options(dump, dump_opts);
  dump->add_option("--out", dump_out, "The safetensors file to write (rank 0)")->required();

  PrepareOptions prepare_opts;
  std::string prepare_log_level = "info";
  CLI::App* prepare =
      app.add_subcommand("prepare", "Tokenize text files into llm.c token shards (train and val)");
  prepare->add_option("inputs", prepare_opts.inputs, "Text files, concatenated in order")->required();
  prepare->add_option("--out", prepare_opts.output_dir, "Output directory")->required();
  prepare->add_option("--name", prepare_opts.name, "Shard name prefix: <name>_train_000000.bin, ...")
      ->capture_default_str();
  prepare->add_option("--tokenizer", prepare_opts.tokenizer, "byte (vocabulary 256) or gpt2")
      ->check(CLI::IsMember({"byte", "gpt2"}))
      ->capture_default_str();
  prepare->add_option("--tokenizer-dir", prepare_opts.tokenizer_dir,
                      "gpt2: directory with encoder.json and vocab.bpe");
  prepare->add_option("--val-fraction", prepare_opts.val_fraction,
                      "Fraction of the tokens (the last ones) that go to the val split")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  prepare->add_option("--shard-tokens", prepare_opts.shard_tokens, "Tokens per shard file")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  prepare->add_option("--log-level", prepare_log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember(kLogLevels))
      ->capture_default_str();

  ConfigOptions bench_opts;
  BenchOptions bench;
  CLI::App* bench_cmd = app.add_subcommand(
      "bench", "Time one training step of the configured model on random tokens (forward, backward, all-reduce, "
                "optimizer); the data and checkpoint keys are not read");
  add_config_options(bench_cmd, bench_opts);
  bench_cmd->add_option("--warmup", bench.warmup, "Untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  bench_cmd->add_option("--repeat", bench.repeat, "Timed steps (the median is reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_cmd->add_option("--csv", bench.csv, "Append one row of results to this CSV file (rank 0)");

  ConfigOptions estimate_opts;
  estimate_opts.any_world = true;
  EstimateOptions estimate;
  CLI::App* estimate_cmd = app.add_subcommand(
      "estimate", "Per-rank memory of the configured run (CPU fp32 and CUDA bf16) and the longest sequence that fits");
  add_config_options(estimate_cmd, estimate_opts);
  estimate_cmd->add_option("--gpus", estimate.gpus, "World size (default: parallel.sequence)")
      ->check(CLI::PositiveNumber);
  estimate_cmd->add_option("--gpu-memory", estimate.gpu_memory, "Memory budget per rank, e.g. 80GB or 141GiB")
      ->capture_default_str();

  // Still to come, each as its own subcommand here (no placeholders are registered until then):
  //   inspect   print a checkpoint's or a token shard's header and statistics

  // A mistyped subcommand ("ulysses trian") would otherwise only read "A subcommand is required".
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known = known || sub->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      if (mpi.world_rank == 0) print_error(fmt::format("unknown subcommand '{}': expected one of {}", argv[1], names));
      return kExitUserError;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank sees the same command line: rank 0 speaks for all.
    std::ostringstream quiet;
    int code = mpi.world_rank == 0 ? app.exit(e) : app.exit(e, quiet, quiet);
    return code == 0 ? 0 : kExitUserError;
  }

  if (train->parsed()) return run_config_subcommand("train", train_opts, mpi);
  if (check->parsed()) return run_config_subcommand("check", check_opts, mpi);
  if (dump->parsed()) return run_config_subcommand("dump", dump_opts, mpi, {}, {}, dump_out);
  if (bench_cmd->parsed()) return run_config_subcommand("bench", bench_opts, mpi, bench);
  if (estimate_cmd->parsed()) return run_config_subcommand("estimate", estimate_opts, mpi, {}, estimate);
  if (prepare->parsed()) return run_prepare_subcommand(prepare_opts, prepare_log_level, mpi);
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
