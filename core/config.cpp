// Config loading: YAML text -> the typed structs of core/config.h, with every error pointing at
// the file, line and column (or the `--set` argument) and saying what was expected.
//
// One table, config_fields(), lists every loadable key: its path, its type, its range or its
// allowed values, and where it lives in Config. Loading, `--set` overrides, per-key checks and
// to_yaml() all walk that table, so a new key in config.h is one new row here (and a line in
// docs/configs.md). Checks that involve several keys (divisibility, seq_len vs max_seq_len,
// required keys, ...) run once the file and all overrides are applied, in check_conflicts().
//
// Message format:  <where>: key 'train.lr': expected a positive number, got '-1'
//   <where> is `<file>:<line>:<col>` (1-based, from yaml-cpp's Mark), `--set train.lr=-1` for an
//   override, or just `<file>` when no single line is to blame.
#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <type_traits>

#include "core/base/error.h"

namespace ulysses {

// The embedded default: byte-for-byte the text of configs/tiny.yaml (tests/config checks that
// both load to the same values). A 4-layer, 128-wide byte-level GPT on synthetic data.
static const char* const kEmbeddedDefault = R"yaml(# tiny: the embedded default (`ulysses train` with no --config runs exactly this).
# A 4-layer, 128-wide byte-level GPT (about 0.86M parameters) on synthetic data: no files needed,
# 150 steps in about a minute on 2 CPU cores. Synthetic tokens are random, so the loss stays near
# ln(256) = 5.55: it checks the plumbing. To learn something, `ulysses prepare` a text file and
# --set data.train=<dir>/data_train_*.bin (files given and no data.source of your own: shards are
# read). Keys not given here take the defaults listed in docs/configs.md.
model:
  n_layer: 4
  n_embd: 128
  n_head: 4
  vocab_size: 256
  max_seq_len: 256
  position_embedding: learned

parallel:
  sequence: 1

train:
  seq_len: 128
  micro_batch_size: 4
  max_steps: 150
  lr: 1.0e-3
  warmup_steps: 20
  lr_schedule: cosine
  eval_interval: 50
  eval_steps: 4

data:
  source: synthetic
  tokenizer: byte

runtime:
  device: auto

logging:
  level: info
  interval: 10
)yaml";

namespace {

// ----------------------------------------------------------------------------------------------
// The key table

enum class Kind { Int, Int64, Uint64, Double, Bool, String, StringList };

template <typename T>
constexpr Kind kind_of() {
  if constexpr (std::is_same_v<T, int>) return Kind::Int;
  else if constexpr (std::is_same_v<T, int64_t>) return Kind::Int64;
  else if constexpr (std::is_same_v<T, uint64_t>) return Kind::Uint64;
  else if constexpr (std::is_same_v<T, double>) return Kind::Double;
  else if constexpr (std::is_same_v<T, bool>) return Kind::Bool;
  else if constexpr (std::is_same_v<T, std::string>) return Kind::String;
  else {
    static_assert(std::is_same_v<T, std::vector<std::string>>, "unsupported config field type");
    return Kind::StringList;
  }
}

struct Field {
  std::string path;                    // "train.lr"
  Kind kind = Kind::Int;
  std::function<void*(Config&)> ref;   // address of the member inside a Config
  // Numeric range: lo <= v <= hi, with either end open (<, >) when *_open.
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false, hi_open = false;
  std::vector<std::string> choices;    // enumerated strings; empty: any string

  std::string group() const { return path.substr(0, path.find('.')); }
  std::string leaf() const { return path.substr(path.find('.') + 1); }

  Field at_least(double v) && { lo = v; return std::move(*this); }
  Field positive() && { lo = 0; lo_open = true; return std::move(*this); }
  Field in(double a, double b) && { lo = a; hi = b; return std::move(*this); }
  Field in_half_open(double a, double b) && { lo = a; hi = b; hi_open = true; return std::move(*this); }
  Field one_of(std::vector<std::string> c) && { choices = std::move(c); return std::move(*this); }
};

template <typename Group, typename T>
Field field(const char* path, Group Config::*group, T Group::*member) {
  Field f;
  f.path = path;
  f.kind = kind_of<T>();
  f.ref = [group, member](Config& c) -> void* { return &((c.*group).*member); };
  return f;
}

const std::vector<std::string> kGroups = {"model",   "parallel",   "train",  "data",
                                          "runtime", "checkpoint", "logging"};

// Every loadable key, in the order to_yaml() prints them. One table, a row per key, so longer than
// a screen on purpose: adding a key is adding its row here (docs/design.md).
const std::vector<Field>& config_fields() {
  using C = Config;
  static const std::vector<Field> fields = [] {
    std::vector<Field> f;
    // model
    f.push_back(field("model.n_layer", &C::model, &ModelConfig::n_layer).at_least(1));
    f.push_back(field("model.n_embd", &C::model, &ModelConfig::n_embd).at_least(1));
    f.push_back(field("model.n_head", &C::model, &ModelConfig::n_head).at_least(1));
    f.push_back(field("model.n_kv_head", &C::model, &ModelConfig::n_kv_head).at_least(0));
    // Token shards store uint16 tokens, so 65536 is the largest vocabulary they can carry.
    f.push_back(field("model.vocab_size", &C::model, &ModelConfig::vocab_size).in(1, 65536));
    f.push_back(field("model.max_seq_len", &C::model, &ModelConfig::max_seq_len).at_least(1));
    f.push_back(field("model.position_embedding", &C::model, &ModelConfig::position_embedding)
                    .one_of({"learned", "rope"}));
    f.push_back(field("model.rope_theta", &C::model, &ModelConfig::rope_theta).positive());
    f.push_back(field("model.init_std", &C::model, &ModelConfig::init_std).positive());
    // parallel
    f.push_back(field("parallel.sequence", &C::parallel, &ParallelConfig::sequence).at_least(1));
    f.push_back(field("parallel.emulate_sequence", &C::parallel, &ParallelConfig::emulate_sequence)
                    .at_least(0));
    f.push_back(field("parallel.zero_stage", &C::parallel, &ParallelConfig::zero_stage).in(0, 3));
    f.push_back(field("parallel.backend", &C::parallel, &ParallelConfig::backend)
                    .one_of({"auto", "mpi", "nccl"}));
    // train
    f.push_back(field("train.seq_len", &C::train, &TrainConfig::seq_len).at_least(1));
    f.push_back(field("train.micro_batch_size", &C::train, &TrainConfig::micro_batch_size).at_least(1));
    f.push_back(field("train.global_batch_tokens", &C::train, &TrainConfig::global_batch_tokens)
                    .at_least(0));
    f.push_back(field("train.max_steps", &C::train, &TrainConfig::max_steps).at_least(0));
    f.push_back(field("train.lr", &C::train, &TrainConfig::lr).positive());
    f.push_back(field("train.min_lr_ratio", &C::train, &TrainConfig::min_lr_ratio).in(0, 1));
    f.push_back(field("train.warmup_steps", &C::train, &TrainConfig::warmup_steps).at_least(0));
    f.push_back(field("train.lr_schedule", &C::train, &TrainConfig::lr_schedule)
                    .one_of({"cosine", "constant", "linear"}));
    f.push_back(field("train.weight_decay", &C::train, &TrainConfig::weight_decay).at_least(0));
    f.push_back(field("train.beta1", &C::train, &TrainConfig::beta1).in_half_open(0, 1));
    f.push_back(field("train.beta2", &C::train, &TrainConfig::beta2).in_half_open(0, 1));
    f.push_back(field("train.eps", &C::train, &TrainConfig::eps).positive());
    f.push_back(field("train.grad_clip", &C::train, &TrainConfig::grad_clip).at_least(0));
    f.push_back(field("train.seed", &C::train, &TrainConfig::seed));
    f.push_back(field("train.eval_interval", &C::train, &TrainConfig::eval_interval).at_least(0));
    f.push_back(field("train.eval_steps", &C::train, &TrainConfig::eval_steps).at_least(0));
    f.push_back(field("train.sample_tokens", &C::train, &TrainConfig::sample_tokens).at_least(0));
    f.push_back(field("train.sample_temperature", &C::train, &TrainConfig::sample_temperature)
                    .positive());
    f.push_back(field("train.max_skipped_steps", &C::train, &TrainConfig::max_skipped_steps)
                    .at_least(0));
    // data
    f.push_back(field("data.train", &C::data, &DataConfig::train));
    f.push_back(field("data.val", &C::data, &DataConfig::val));
    f.push_back(field("data.source", &C::data, &DataConfig::source).one_of({"shards", "synthetic"}));
    f.push_back(field("data.shuffle", &C::data, &DataConfig::shuffle));
    f.push_back(field("data.tokenizer", &C::data, &DataConfig::tokenizer).one_of({"byte", "gpt2"}));
    f.push_back(field("data.tokenizer_dir", &C::data, &DataConfig::tokenizer_dir));
    // runtime
    f.push_back(field("runtime.device", &C::runtime, &RuntimeConfig::device)
                    .one_of({"auto", "cpu", "cuda"}));
    f.push_back(field("runtime.recompute", &C::runtime, &RuntimeConfig::recompute)
                    .one_of({"none", "selective", "full"}));
    f.push_back(field("runtime.offload", &C::runtime, &RuntimeConfig::offload).one_of({"none", "checkpoints"}));
    f.push_back(field("runtime.tile_tokens", &C::runtime, &RuntimeConfig::tile_tokens).at_least(0));
    f.push_back(field("runtime.attention", &C::runtime, &RuntimeConfig::attention)
                    .one_of({"auto", "flash", "cudnn"}));
    f.push_back(field("runtime.threads", &C::runtime, &RuntimeConfig::threads).at_least(0));
    f.push_back(field("runtime.comm_timeout", &C::runtime, &RuntimeConfig::comm_timeout).positive());
    f.push_back(field("runtime.overlap_comm", &C::runtime, &RuntimeConfig::overlap_comm));
    f.push_back(field("runtime.all_to_all_chunks", &C::runtime, &RuntimeConfig::all_to_all_chunks).at_least(1));
    f.push_back(field("runtime.debug_inject_nan_step", &C::runtime, &RuntimeConfig::debug_inject_nan_step)
                    .at_least(0));
    f.push_back(field("runtime.debug_inject_nan_steps", &C::runtime, &RuntimeConfig::debug_inject_nan_steps)
                    .at_least(1));
    // checkpoint
    f.push_back(field("checkpoint.dir", &C::checkpoint, &CheckpointConfig::dir));
    f.push_back(field("checkpoint.interval", &C::checkpoint, &CheckpointConfig::interval).at_least(0));
    f.push_back(field("checkpoint.keep_last", &C::checkpoint, &CheckpointConfig::keep_last).at_least(0));
    f.push_back(field("checkpoint.resume", &C::checkpoint, &CheckpointConfig::resume));
    f.push_back(field("checkpoint.init_from", &C::checkpoint, &CheckpointConfig::init_from));
    f.push_back(field("checkpoint.export_llmc", &C::checkpoint, &CheckpointConfig::export_llmc));
    f.push_back(field("checkpoint.export_hf", &C::checkpoint, &CheckpointConfig::export_hf));
    // logging
    f.push_back(field("logging.level", &C::logging, &LoggingConfig::level)
                    .one_of({"trace", "debug", "info", "warn", "error"}));
    f.push_back(field("logging.interval", &C::logging, &LoggingConfig::interval).at_least(1));
    f.push_back(field("logging.metrics_file", &C::logging, &LoggingConfig::metrics_file));
    f.push_back(field("logging.all_ranks", &C::logging, &LoggingConfig::all_ranks));
    return f;
  }();
  return fields;
}

const Field* find_field(const std::string& path) {
  for (const Field& f : config_fields())
    if (f.path == path) return &f;
  return nullptr;
}

bool is_group(const std::string& name) {
  return std::find(kGroups.begin(), kGroups.end(), name) != kGroups.end();
}

template <typename T>
T& member(const Field& f, Config& c) { return *static_cast<T*>(f.ref(c)); }
// Read-only access through the same accessor (the lambda only takes an address).
template <typename T>
const T& member(const Field& f, const Config& c) {
  return *static_cast<const T*>(f.ref(const_cast<Config&>(c)));
}

// ----------------------------------------------------------------------------------------------
// Suggestions for unknown keys and values

// Optimal-string-alignment distance: Levenshtein plus adjacent transpositions ("modle").
int edit_distance(const std::string& a, const std::string& b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<int>> d(n + 1, std::vector<int>(m + 1));
  for (size_t i = 0; i <= n; i++) d[i][0] = int(i);
  for (size_t j = 0; j <= m; j++) d[0][j] = int(j);
  for (size_t i = 1; i <= n; i++) {
    for (size_t j = 1; j <= m; j++) {
      int cost = std::tolower(a[i - 1]) == std::tolower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[n][m];
}

// The candidate closest to `word`, when it is close enough to be a plausible typo.
std::optional<std::string> closest(const std::string& word, const std::vector<std::string>& candidates) {
  int best = std::numeric_limits<int>::max();
  std::optional<std::string> best_name;
  for (const std::string& c : candidates) {
    int d = edit_distance(word, c);
    if (d < best) { best = d; best_name = c; }
  }
  int allowed = std::max(2, int(word.size()) / 3);
  if (best_name && best <= allowed) return best_name;
  return std::nullopt;
}

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string s;
  for (size_t i = 0; i < items.size(); i++) s += (i ? sep : "") + items[i];
  return s;
}

// `path` is "group.leaf" or a lone name; returns " (did you mean 'x'?)" or a list of valid keys.
std::string unknown_key_hint(const std::string& path) {
  size_t dot = path.find('.');
  std::string group = dot == std::string::npos ? "" : path.substr(0, dot);
  std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);

  std::vector<std::string> all_paths;
  for (const Field& f : config_fields()) all_paths.push_back(f.path);

  if (!group.empty() && is_group(group)) {
    std::vector<std::string> leaves;
    for (const Field& f : config_fields())
      if (f.group() == group) leaves.push_back(f.leaf());
    if (auto s = closest(leaf, leaves)) return fmt::format(" (did you mean '{}.{}'?)", group, *s);
    // The right name in the wrong group ("model.lr" -> "train.lr").
    for (const Field& f : config_fields())
      if (f.leaf() == leaf) return fmt::format(" (did you mean '{}'?)", f.path);
    return fmt::format("; valid keys in '{}' are: {}", group, join(leaves));
  }
  // A lone name at the top level, or an unknown group.
  if (group.empty()) {
    for (const Field& f : config_fields())
      if (f.leaf() == leaf) return fmt::format(" (did you mean '{}'?)", f.path);
    if (auto s = closest(leaf, kGroups)) return fmt::format(" (did you mean '{}'?)", *s);
    return fmt::format("; the top level holds the groups: {}", join(kGroups));
  }
  if (auto s = closest(path, all_paths)) return fmt::format(" (did you mean '{}'?)", *s);
  if (auto s = closest(group, kGroups)) {
    std::string fixed = *s + "." + leaf;
    if (find_field(fixed)) return fmt::format(" (did you mean '{}'?)", fixed);
    return fmt::format(" (did you mean group '{}'?)", *s);
  }
  return fmt::format("; the groups are: {}", join(kGroups));
}

// ----------------------------------------------------------------------------------------------
// Scalar conversion

std::string where_of(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return fmt::format("{}:{}:{}", source, mark.line + 1, mark.column + 1);
}

std::string expectation(const Field& f) {
  if (!f.choices.empty()) return "one of " + join(f.choices);
  auto num = [](double v) { return fmt::format("{}", v); };
  bool has_lo = std::isfinite(f.lo), has_hi = std::isfinite(f.hi);
  switch (f.kind) {
    case Kind::Bool: return "true or false";
    case Kind::String: return "a string";
    case Kind::StringList: return "a list of strings (or a single string)";
    case Kind::Int:
    case Kind::Int64:
    case Kind::Uint64:
      if (f.kind == Kind::Uint64) return "a non-negative integer";
      if (has_lo && has_hi) return fmt::format("an integer in {}..{}", num(f.lo), num(f.hi));
      if (has_lo) return fmt::format("an integer >= {}", num(f.lo));
      return "an integer";
    case Kind::Double:
      if (has_lo && has_hi)
        return fmt::format("a number in {}{}, {}{}", f.lo_open ? "(" : "[", num(f.lo), num(f.hi),
                           f.hi_open ? ")" : "]");
      if (has_lo && f.lo_open && f.lo == 0) return "a positive number";
      if (has_lo) return fmt::format("a number {} {}", f.lo_open ? ">" : ">=", num(f.lo));
      return "a number";
  }
  return "a value";
}

// What the user wrote, for "got ...".
std::string describe(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) return "an empty value";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a map";
  if (n.Tag() == "!") return fmt::format("the quoted string '{}'", n.Scalar());
  return fmt::format("'{}'", n.Scalar());
}

[[noreturn]] void fail_value(const std::string& where, const Field& f, const YAML::Node& n,
                             const std::string& extra = "") {
  throw_user_error("{}: key '{}': expected {}, got {}{}", where, f.path, expectation(f), describe(n),
                   extra);
}

// A plain (unquoted) scalar, which is the only form numbers and booleans may take.
bool plain_scalar(const YAML::Node& n) { return n.IsScalar() && n.Tag() != "!"; }

std::optional<long long> parse_integer(const std::string& s) {
  const char* b = s.data();
  const char* e = s.data() + s.size();
  if (b != e && *b == '+') b++;
  if (b == e) return std::nullopt;
  long long v = 0;
  auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e) return std::nullopt;
  return v;
}

std::optional<unsigned long long> parse_unsigned(const std::string& s) {
  const char* b = s.data();
  const char* e = s.data() + s.size();
  if (b != e && *b == '+') b++;
  if (b == e || *b == '-') return std::nullopt;
  unsigned long long v = 0;
  auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e) return std::nullopt;
  return v;
}

std::optional<double> parse_number(const std::string& s) {
  const char* b = s.data();
  const char* e = s.data() + s.size();
  if (b != e && *b == '+') b++;
  if (b == e) return std::nullopt;
  double v = 0;
  auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::optional<bool> parse_bool(const std::string& s) {
  std::string l = s;
  for (char& ch : l) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  if (l == "true" || l == "yes" || l == "on") return true;
  if (l == "false" || l == "no" || l == "off") return false;
  return std::nullopt;
}

bool in_range(const Field& f, double v) {
  if (f.lo_open ? !(v > f.lo) : !(v >= f.lo)) return false;
  if (f.hi_open ? !(v < f.hi) : !(v <= f.hi)) return false;
  return true;
}

// Converts `n` to the field's type, checks its range or choices, and stores it in `c`.
void assign(const Field& f, const YAML::Node& n, const std::string& where, Config& c) {
  switch (f.kind) {
    case Kind::Int:
    case Kind::Int64: {
      std::optional<long long> v = plain_scalar(n) ? parse_integer(n.Scalar()) : std::nullopt;
      if (!v) fail_value(where, f, n);
      long long lo = f.kind == Kind::Int ? std::numeric_limits<int>::min()
                                         : std::numeric_limits<int64_t>::min();
      long long hi = f.kind == Kind::Int ? std::numeric_limits<int>::max()
                                         : std::numeric_limits<int64_t>::max();
      if (*v < lo || *v > hi) fail_value(where, f, n, " (out of range)");
      if (!in_range(f, double(*v))) fail_value(where, f, n);
      if (f.kind == Kind::Int) member<int>(f, c) = int(*v);
      else member<int64_t>(f, c) = int64_t(*v);
      return;
    }
    case Kind::Uint64: {
      std::optional<unsigned long long> v = plain_scalar(n) ? parse_unsigned(n.Scalar()) : std::nullopt;
      if (!v) fail_value(where, f, n);
      member<uint64_t>(f, c) = uint64_t(*v);
      return;
    }
    case Kind::Double: {
      std::optional<double> v = plain_scalar(n) ? parse_number(n.Scalar()) : std::nullopt;
      if (!v || !in_range(f, *v)) fail_value(where, f, n);
      member<double>(f, c) = *v;
      return;
    }
    case Kind::Bool: {
      std::optional<bool> v = plain_scalar(n) ? parse_bool(n.Scalar()) : std::nullopt;
      if (!v) fail_value(where, f, n);
      member<bool>(f, c) = *v;
      return;
    }
    case Kind::String: {
      if (n.IsNull() && f.choices.empty()) { member<std::string>(f, c) = ""; return; }
      if (!n.IsScalar()) fail_value(where, f, n);
      const std::string& s = n.Scalar();
      if (!f.choices.empty() &&
          std::find(f.choices.begin(), f.choices.end(), s) == f.choices.end()) {
        std::optional<std::string> hint = closest(s, f.choices);
        fail_value(where, f, n, hint ? fmt::format(" (did you mean '{}'?)", *hint) : "");
      }
      member<std::string>(f, c) = s;
      return;
    }
    case Kind::StringList: {
      std::vector<std::string> items;
      if (n.IsScalar()) {
        items.push_back(n.Scalar());
      } else if (n.IsSequence()) {
        for (const YAML::Node& item : n) {
          if (!item.IsScalar())
            throw_user_error("{}: key '{}': expected {}, but an item is {}", where, f.path,
                             expectation(f), describe(item));
          items.push_back(item.Scalar());
        }
      } else if (!n.IsNull()) {
        fail_value(where, f, n);
      }
      member<std::vector<std::string>>(f, c) = std::move(items);
      return;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Keys without effect
//
// A key whose effect another key switches off (data.train under data.source: synthetic,
// rope_theta with learned positions, ...). Left at its default such a key is harmless; set to
// anything else it would be silently ignored, so the loader refuses it, naming both keys and the
// fix. One exception keeps overrides practical: when the key that switches it off was set by a
// later --set than the key itself (`--config gpt2-124m.yaml --set train.sample_tokens=0` makes
// the file's data.tokenizer_dir moot), the later word wins and the loader only notes it
// (Config::notes, logged on rank 0 at start-up). Settings whose effect depends on the device or
// the world size are checked when the job starts (inert_at_start, below).

std::string format_value(const Field& f, const Config& c);

bool resume_names_checkpoint(const Config& c) {
  return !c.checkpoint.resume.empty() && c.checkpoint.resume != "auto";
}
bool has_validation(const Config& c) { return c.data.source == "synthetic" || !c.data.val.empty(); }
int sequence_degree(const Config& c) {
  return c.parallel.emulate_sequence > 1 ? c.parallel.emulate_sequence : c.parallel.sequence;
}

struct InertRule {
  const char* key;     // the key that would have no effect
  const char* cause;   // the key whose value switches it off
  bool (*inert)(const Config&);
  const char* why;     // why, given the cause's value ("{}" is that value)
  const char* fix;
};

const std::vector<InertRule>& inert_rules() {
  static const std::vector<InertRule> rules = {
      {"model.rope_theta", "model.position_embedding", [](const Config& c) { return !c.model.rope(); },
       "model.position_embedding is '{}' (rope_theta is the rotary base)",
       "set model.position_embedding: rope, or drop model.rope_theta"},
      {"model.init_std", "checkpoint.init_from", [](const Config& c) { return !c.checkpoint.init_from.empty(); },
       "checkpoint.init_from is '{}' (the weights come from that file)",
       "drop model.init_std, or drop checkpoint.init_from to initialise from the seed"},
      {"model.init_std", "checkpoint.resume", resume_names_checkpoint,
       "checkpoint.resume is '{}' (the weights come from that checkpoint)",
       "drop model.init_std, or use checkpoint.resume: auto"},
      {"train.min_lr_ratio", "train.lr_schedule", [](const Config& c) { return c.train.lr_schedule == "constant"; },
       "train.lr_schedule is '{}' (the learning rate never decays)",
       "set train.lr_schedule: cosine or linear, or drop train.min_lr_ratio"},
      {"train.sample_temperature", "train.sample_tokens", [](const Config& c) { return c.train.sample_tokens == 0; },
       "train.sample_tokens is {} (no sample is generated)",
       "set train.sample_tokens > 0, or drop train.sample_temperature"},
      {"train.eval_interval", "data.val", [](const Config& c) { return !has_validation(c); },
       "data.val lists no validation shards (no validation pass runs)",
       "list validation shards in data.val, or drop train.eval_interval"},
      // eval_steps 0 turns validation off, which agrees with having no validation data
      {"train.eval_steps", "data.val", [](const Config& c) { return !has_validation(c) && c.train.eval_steps > 0; },
       "data.val lists no validation shards (no validation pass runs)",
       "list validation shards in data.val, or drop train.eval_steps"},
      {"train.eval_interval", "train.eval_steps", [](const Config& c) { return c.train.eval_steps == 0; },
       "train.eval_steps is {} (validation is off)",
       "set train.eval_steps > 0, or drop train.eval_interval"},
      {"data.train", "data.source", [](const Config& c) { return c.data.source == "synthetic"; },
       "data.source is '{}' (random tokens; no file is read)",
       "set data.source: shards, or drop data.train"},
      {"data.val", "data.source", [](const Config& c) { return c.data.source == "synthetic"; },
       "data.source is '{}' (random tokens; no file is read)",
       "set data.source: shards and list data.train too, or drop data.val"},
      {"data.shuffle", "data.source", [](const Config& c) { return c.data.source == "synthetic"; },
       "data.source is '{}' (the tokens are random already)",
       "set data.source: shards, or drop data.shuffle"},
      {"data.tokenizer", "train.sample_tokens", [](const Config& c) { return c.train.sample_tokens == 0; },
       "train.sample_tokens is {} (the tokenizer only decodes the sample printed at the end; token "
       "shards are already tokenized, see `ulysses prepare --tokenizer`)",
       "set train.sample_tokens > 0, or drop data.tokenizer"},
      {"data.tokenizer_dir", "data.tokenizer", [](const Config& c) { return c.data.tokenizer != "gpt2"; },
       "data.tokenizer is '{}' (only gpt2 reads files)",
       "set data.tokenizer: gpt2, or drop data.tokenizer_dir"},
      {"data.tokenizer_dir", "train.sample_tokens", [](const Config& c) { return c.train.sample_tokens == 0; },
       "train.sample_tokens is {} (the tokenizer only decodes the sample printed at the end)",
       "set train.sample_tokens > 0, or drop data.tokenizer_dir"},
      {"runtime.attention", "runtime.device", [](const Config& c) { return c.runtime.device == "cpu"; },
       "runtime.device is '{}' (the CPU runs its fp32 reference attention)",
       "drop runtime.attention, or set runtime.device: cuda"},
      {"runtime.all_to_all_chunks", "parallel.sequence", [](const Config& c) { return sequence_degree(c) == 1; },
       "parallel.sequence is {} (no all-to-all runs without sequence parallelism)",
       "set parallel.sequence (or parallel.emulate_sequence) > 1, or drop runtime.all_to_all_chunks"},
      {"runtime.debug_inject_nan_steps", "runtime.debug_inject_nan_step",
       [](const Config& c) { return c.runtime.debug_inject_nan_step == 0; },
       "runtime.debug_inject_nan_step is {} (no NaN is injected)",
       "set runtime.debug_inject_nan_step, or drop runtime.debug_inject_nan_steps"},
      {"checkpoint.keep_last", "checkpoint.dir", [](const Config& c) { return c.checkpoint.dir.empty(); },
       "checkpoint.dir is empty (no checkpoint is written)",
       "set checkpoint.dir, or drop checkpoint.keep_last"},
      {"checkpoint.init_from", "checkpoint.resume", resume_names_checkpoint,
       "checkpoint.resume is '{}' (the run continues from that checkpoint)",
       "drop checkpoint.init_from, or use checkpoint.resume: auto, which starts from init_from while "
       "checkpoint.dir holds no checkpoint yet"},
      {"logging.all_ranks", "logging.level",
       [](const Config& c) { return c.logging.level == "warn" || c.logging.level == "error"; },
       "logging.level is '{}' (all_ranks concerns info lines and below; every rank prints warnings and errors)",
       "set logging.level: info, or drop logging.all_ranks"},
  };
  return rules;
}

// ----------------------------------------------------------------------------------------------
// Loading a document and applying overrides

struct Loader {
  std::string source;                         // the file name, or "<embedded default>"
  bool embedded = false;                      // the document is the embedded default
  Config config;
  std::map<std::string, std::string> origin;  // key path (or group) -> where it was set
  // key path -> when it was set: -1 by the embedded default, 0 by the user's file, k by the k-th
  // --set. Keys absent were not set at all.
  std::map<std::string, int> order;
  int overrides_applied = 0;

  bool set_by_user(const std::string& path) const {
    auto it = order.find(path);
    return it != order.end() && it->second >= 0;
  }
  int set_when(const std::string& path) const {
    auto it = order.find(path);
    return it == order.end() ? -2 : it->second;
  }

  std::string at(const YAML::Mark& m) const { return where_of(source, m); }

  // Where the first of `keys` that was set explicitly was set; the source name otherwise.
  std::string where_set(std::initializer_list<const char*> keys) const {
    for (const char* k : keys) {
      auto it = origin.find(k);
      if (it != origin.end()) return it->second;
    }
    return source;
  }

  void load_document(const std::string& yaml) {
    YAML::Node root;
    try {
      root = YAML::Load(yaml);
    } catch (const YAML::Exception& e) {
      throw_user_error("{}: invalid YAML: {}", at(e.mark), e.msg);
    }
    if (!root.IsDefined() || root.IsNull()) return;  // an empty file: all defaults
    if (!root.IsMap())
      throw_user_error("{}: expected a map of groups ({}), got {}", at(root.Mark()), join(kGroups),
                       describe(root));
    std::map<std::string, std::string> seen_groups;
    // Node copies are cheap handles; references into yaml-cpp's iterator proxies would dangle.
    for (const auto& entry : root) {
      const YAML::Node key = entry.first;
      const YAML::Node body = entry.second;
      if (!key.IsScalar())
        throw_user_error("{}: expected a group name ({}), got {}", at(key.Mark()), join(kGroups),
                         describe(key));
      const std::string& group = key.Scalar();
      if (!is_group(group))
        throw_user_error("{}: unknown key '{}'{}", at(key.Mark()), group, unknown_key_hint(group));
      if (auto it = seen_groups.find(group); it != seen_groups.end())
        throw_user_error("{}: group '{}' appears twice (first at {})", at(key.Mark()), group, it->second);
      seen_groups[group] = at(key.Mark());
      origin[group] = at(key.Mark());
      if (body.IsNull()) continue;  // "model:" with nothing under it
      if (!body.IsMap())
        throw_user_error("{}: key '{}': expected a map of {} keys, got {}",
                         at(body.Mark().is_null() ? key.Mark() : body.Mark()), group, group,
                         describe(body));
      for (const auto& kv : body) {
        const YAML::Node k = kv.first;
        const YAML::Node v = kv.second;
        if (!k.IsScalar())
          throw_user_error("{}: expected a key name in '{}', got {}", at(k.Mark()), group, describe(k));
        std::string path = group + "." + k.Scalar();
        const Field* f = find_field(path);
        if (!f) throw_user_error("{}: unknown key '{}'{}", at(k.Mark()), path, unknown_key_hint(path));
        if (auto it = origin.find(path); it != origin.end())
          throw_user_error("{}: key '{}' appears twice (first at {})", at(k.Mark()), path, it->second);
        // A value's own mark is the most precise place; an empty value's mark points past the
        // key's line, so use the key's.
        std::string where = at(v.IsNull() || v.Mark().is_null() ? k.Mark() : v.Mark());
        assign(*f, v, where, config);
        origin[path] = where;
        order[path] = embedded ? -1 : 0;
      }
    }
  }

  // "key.path=value"; the value is YAML (a scalar or a [list]).
  void apply_override(const std::string& arg) {
    std::string where = "--set " + arg;
    size_t eq = arg.find('=');
    if (eq == std::string::npos || eq == 0)
      throw_user_error("{}: expected key.path=value, e.g. --set train.lr=3e-4", where);
    std::string path = arg.substr(0, eq);
    std::string text = arg.substr(eq + 1);
    while (!path.empty() && std::isspace(static_cast<unsigned char>(path.back()))) path.pop_back();
    if (is_group(path)) {
      std::vector<std::string> leaves;
      for (const Field& f : config_fields())
        if (f.group() == path) leaves.push_back(f.leaf());
      throw_user_error("{}: key '{}' is a group; set one of its keys ({}), e.g. --set {}.{}=...",
                       where, path, join(leaves), path, leaves.front());
    }
    const Field* f = find_field(path);
    if (!f) throw_user_error("{}: unknown key '{}'{}", where, path, unknown_key_hint(path));
    YAML::Node value;
    try {
      value = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      // Paths such as "*.bin" or "a: b" are not valid YAML scalars; string keys take them as is.
      if (f->kind != Kind::String && f->kind != Kind::StringList)
        throw_user_error("{}: key '{}': invalid YAML value: {}", where, path, e.msg);
      value = YAML::Node(text);
    }
    assign(*f, value, where, config);
    origin[path] = where;
    order[path] = ++overrides_applied;
  }

  // Choices the user left to the loader. data.train given without a data.source of the user's own
  // (e.g. `ulysses train --set data.train=x.bin` over the embedded default, whose source is
  // synthetic): the files are what the user asked for, so the source is shards.
  void resolve_choices() {
    DataConfig& d = config.data;
    if (d.source == "synthetic" && set_by_user("data.train") && !set_by_user("data.source")) {
      d.source = "shards";
      config.notes.push_back(fmt::format(
          "data.source: shards, since data.train is set ({}) and data.source was not (the {} says synthetic)",
          origin.at("data.train"), embedded ? "embedded default" : "default"));
    }
  }

  // Keys set to something other than their default while another key makes them meaningless
  // (inert_rules, above): an error, or a note when the other key's --set came later.
  void check_inert() {
    static const Config defaults;
    for (const InertRule& r : inert_rules()) {
      if (!r.inert(config)) continue;
      const Field& key = *find_field(r.key);
      if (format_value(key, config) == format_value(key, defaults)) continue;
      // The embedded default's own settings count as defaults: `--set data.train=x.bin` over it
      // leaves its eval_interval without validation files, which the user never asked for.
      if (set_when(r.key) == -1) continue;
      const Field& cause = *find_field(r.cause);
      const std::string value = cause.kind == Kind::String && cause.choices.empty()
                                    ? member<std::string>(cause, config)
                                    : format_value(cause, config);
      const std::string why = fmt::format(fmt::runtime(r.why), value);
      const int key_when = set_when(r.key), cause_when = set_when(r.cause);
      if (cause_when > 0 && cause_when > key_when) {
        config.notes.push_back(fmt::format("{}: key '{}' has no effect, because {}, set later by {}",
                                           where_set({r.key}), r.key, why, origin.at(r.cause)));
        continue;
      }
      throw_user_error("{}: key '{}' has no effect, because {}: {}", where_set({r.key}), r.key, why, r.fix);
    }
  }

  // Checks across keys, once everything is loaded, in this order (the first error is reported).
  // The location is the most specific key that was set explicitly (an override wins over the
  // file, which wins over the default).
  void check_conflicts() const {
    check_model_conflicts();
    check_parallel_conflicts();
    check_batch_conflicts();
    check_runtime_conflicts();
    check_data_conflicts();
    check_checkpoint_conflicts();
  }

  // heads, head_dim, positions
  void check_model_conflicts() const {
    const ModelConfig& m = config.model;
    const TrainConfig& t = config.train;
    if (m.n_embd % m.n_head != 0)
      throw_user_error("{}: key 'model.n_embd' ({}) must be divisible by model.n_head ({}): "
                       "each head gets n_embd / n_head channels",
                       where_set({"model.n_head", "model.n_embd"}), m.n_embd, m.n_head);
    if (m.n_kv_head > 0 && (m.n_kv_head > m.n_head || m.n_head % m.n_kv_head != 0)) {
      std::vector<std::string> valid;
      for (int d = 1; d <= m.n_head; d++)
        if (m.n_head % d == 0) valid.push_back(std::to_string(d));
      throw_user_error("{}: key 'model.n_kv_head' ({}) must divide model.n_head ({}): valid values "
                       "are {} (0 means n_head)",
                       where_set({"model.n_kv_head", "model.n_head"}), m.n_kv_head, m.n_head,
                       join(valid));
    }
    if (m.rope() && m.head_dim() % 2 != 0)
      throw_user_error("{}: model.position_embedding 'rope' rotates channel pairs and needs an even "
                       "head_dim, but n_embd / n_head = {} / {} = {}",
                       where_set({"model.position_embedding", "model.n_head", "model.n_embd"}),
                       m.n_embd, m.n_head, m.head_dim());
    if (t.seq_len > m.max_seq_len)
      throw_user_error("{}: key 'train.seq_len' ({}) must be <= model.max_seq_len ({})",
                       where_set({"train.seq_len", "model.max_seq_len"}), t.seq_len, m.max_seq_len);
  }

  void check_parallel_conflicts() const {
    const ModelConfig& m = config.model;
    const ParallelConfig& p = config.parallel;
    const TrainConfig& t = config.train;
    // Sequence parallelism: P ranks each hold seq_len / P tokens and, inside attention, about
    // n_head / P heads. emulate_sequence runs one rank's share of a P-rank job on a single rank.
    if (p.emulate_sequence > 1 && p.sequence > 1)
      throw_user_error("{}: parallel.emulate_sequence ({}) emulates a sequence-parallel run on one "
                       "rank; it needs parallel.sequence 1, got {}",
                       where_set({"parallel.emulate_sequence", "parallel.sequence"}),
                       p.emulate_sequence, p.sequence);
    const bool emulated = p.emulate_sequence > 1;
    const int P = emulated ? p.emulate_sequence : p.sequence;
    const char* pkey = emulated ? "parallel.emulate_sequence" : "parallel.sequence";
    if (P > 1) {
      if (P > t.seq_len)
        throw_user_error("{}: key '{}' ({}) must be <= train.seq_len ({}): every rank needs at least "
                         "one token",
                         where_set({pkey, "train.seq_len"}), pkey, P, t.seq_len);
      if (t.seq_len % P != 0) {
        int below = t.seq_len / P * P, above = below + P;
        std::string nearest = below > 0 ? fmt::format("{} and {}", below, above) : std::to_string(above);
        throw_user_error("{}: key 'train.seq_len' ({}) must be a multiple of {} ({}): nearest valid "
                         "values are {}",
                         where_set({"train.seq_len", pkey}), t.seq_len, pkey, P, nearest);
      }
      // Heads need not divide evenly (comm/ulysses.h gives the first n_head % P ranks one more,
      // and sends a key/value head to every rank whose query heads use it), but every rank
      // needs at least one query head.
      if (P > m.n_head)
        throw_user_error("{}: key '{}' ({}) must be <= model.n_head ({}): inside attention each "
                         "of the P ranks computes at least one query head",
                         where_set({pkey, "model.n_head"}), pkey, P, m.n_head);
      // each chunk of the pipelined all-to-alls is at least one of the seq_len / P local tokens
      if (config.runtime.all_to_all_chunks > t.seq_len / P)
        throw_user_error("{}: key 'runtime.all_to_all_chunks' ({}) must be <= the {} local tokens of a rank, "
                         "train.seq_len / {} = {} / {}",
                         where_set({"runtime.all_to_all_chunks", "train.seq_len", pkey}),
                         config.runtime.all_to_all_chunks, t.seq_len / P, pkey, t.seq_len, P);
    }
  }

  void check_batch_conflicts() const {
    const TrainConfig& t = config.train;
    if (t.global_batch_tokens > 0) {
      int64_t per_group = int64_t(t.micro_batch_size) * t.seq_len;
      if (t.global_batch_tokens % per_group != 0) {
        int64_t below = t.global_batch_tokens / per_group * per_group, above = below + per_group;
        std::string nearest = below > 0 ? fmt::format("{} and {}", below, above) : std::to_string(above);
        throw_user_error("{}: key 'train.global_batch_tokens' ({}) must be a multiple of "
                         "micro_batch_size × seq_len = {} × {} = {}: nearest valid values are {}",
                         where_set({"train.global_batch_tokens", "train.micro_batch_size",
                                    "train.seq_len"}),
                         t.global_batch_tokens, t.micro_batch_size, t.seq_len, per_group, nearest);
      }
    }
  }

  // the device, the backend, attention, recompute and offload
  void check_runtime_conflicts() const {
    const ParallelConfig& p = config.parallel;
    const RuntimeConfig& r = config.runtime;
    if (p.backend == "nccl" && r.device == "cpu")
      throw_user_error("{}: parallel.backend 'nccl' moves device memory and needs runtime.device "
                       "cuda (or auto), got 'cpu'",
                       where_set({"parallel.backend", "runtime.device"}));
    if (r.attention == "cudnn" && r.device == "cpu")
      throw_user_error("{}: runtime.attention 'cudnn' runs on the GPU and needs runtime.device cuda "
                       "(or auto), got 'cpu'",
                       where_set({"runtime.attention", "runtime.device"}));
    // the checkpoints are the per-layer outputs that only full recompute keeps, and the copies
    // run on a CUDA stream (core/gpt.h, docs/memory.md)
    if (r.offload == "checkpoints" && r.recompute != "full")
      throw_user_error("{}: runtime.offload 'checkpoints' moves the per-layer checkpoints of full recompute to "
                       "host memory and needs runtime.recompute full, got '{}'",
                       where_set({"runtime.offload", "runtime.recompute"}), r.recompute);
    if (r.offload == "checkpoints" && r.device != "cuda")
      throw_user_error("{}: runtime.offload 'checkpoints' copies between GPU and pinned host memory and needs "
                       "runtime.device cuda, got '{}'",
                       where_set({"runtime.offload", "runtime.device"}), r.device);
    // a second CUDA stream for ZeRO 2 / 3's per-layer collectives (core/zero3.h)
    if (r.overlap_comm && r.device != "cuda")
      throw_user_error("{}: runtime.overlap_comm runs ZeRO's per-layer collectives on a second CUDA stream and "
                       "needs runtime.device cuda, got '{}'",
                       where_set({"runtime.overlap_comm", "runtime.device"}), r.device);
  }

  void check_data_conflicts() const {
    const TrainConfig& t = config.train;
    const DataConfig& d = config.data;
    if (d.source == "shards" && d.train.empty())
      throw_user_error("{}: key 'data.train' is required when data.source is 'shards': list the "
                       "token shard files (paths or globs), or set data.source: synthetic",
                       where_set({"data.source", "data"}));
    if (d.tokenizer == "gpt2" && t.sample_tokens > 0 && d.tokenizer_dir.empty())
      throw_user_error("{}: key 'data.tokenizer_dir' is required when data.tokenizer is 'gpt2' and "
                       "train.sample_tokens > 0: the directory with encoder.json and vocab.bpe",
                       where_set({"data.tokenizer", "train.sample_tokens", "data"}));
  }

  void check_checkpoint_conflicts() const {
    const CheckpointConfig& ck = config.checkpoint;
    if (ck.interval > 0 && ck.dir.empty())
      throw_user_error("{}: key 'checkpoint.interval' ({}) needs checkpoint.dir, the directory "
                       "checkpoints are written to",
                       where_set({"checkpoint.interval"}), ck.interval);
    if (ck.resume == "auto" && ck.dir.empty())
      throw_user_error("{}: checkpoint.resume 'auto' resumes from the newest checkpoint in "
                       "checkpoint.dir, which is empty",
                       where_set({"checkpoint.resume"}));
  }
};

// A string as a YAML double-quoted scalar, escaped so that any bytes read back the same.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (ch < 0x20 || ch == 0x7f) out += fmt::format("\\x{:02x}", ch);
        else out += char(ch);
    }
  }
  return out + "\"";
}

std::string format_value(const Field& f, const Config& c) {
  switch (f.kind) {
    case Kind::Int: return std::to_string(member<int>(f, c));
    case Kind::Int64: return std::to_string(member<int64_t>(f, c));
    case Kind::Uint64: return std::to_string(member<uint64_t>(f, c));
    // fmt's "{}" is the shortest text that reads back to the same double.
    case Kind::Double: return fmt::format("{}", member<double>(f, c));
    case Kind::Bool: return member<bool>(f, c) ? "true" : "false";
    case Kind::String: {
      const std::string& s = member<std::string>(f, c);
      return f.choices.empty() ? quote(s) : s;
    }
    case Kind::StringList: {
      std::vector<std::string> items;
      for (const std::string& s : member<std::vector<std::string>>(f, c)) items.push_back(quote(s));
      return "[" + join(items) + "]";
    }
  }
  return "";
}

Config load(const std::string& yaml, const std::string& source,
            const std::vector<std::string>& overrides, bool embedded = false) {
  Loader loader;
  loader.source = source;
  loader.embedded = embedded;
  loader.load_document(yaml);
  for (const std::string& o : overrides) loader.apply_override(o);
  loader.resolve_choices();
  loader.check_conflicts();
  loader.check_inert();
  loader.config.source = source;
  return std::move(loader.config);
}

}  // namespace

Config load_config_string(const std::string& yaml, const std::string& source,
                          const std::vector<std::string>& overrides) {
  return load(yaml, source, overrides);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return load(kEmbeddedDefault, "<embedded default>", overrides, /*embedded=*/true);
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw_user_error("{}: is a directory, expected a YAML config file", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_user_error("{}: cannot open the config file: {}", path, std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) throw_user_error("{}: cannot read the config file", path);
  return load(text.str(), path, overrides);
}

void validate_for_world(const Config& c, int world_size) {
  ULYSSES_ASSERT(world_size >= 1, "world size {}", world_size);
  const int P = c.parallel.sequence;
  if (world_size % P != 0) {
    // P values that fit this world and this model (seq_len divisible, a query head per rank).
    std::vector<std::string> valid;
    for (int d = 1; d <= world_size; d++)
      if (world_size % d == 0 && d <= c.model.n_head && c.train.seq_len % d == 0)
        valid.push_back(std::to_string(d));
    throw_user_error("{}: key 'parallel.sequence' ({}) must divide the world size ({} ranks): valid "
                     "values for this world and model are {}",
                     c.source, P, world_size, join(valid));
  }
  const int64_t dp = world_size / P;
  const TrainConfig& t = c.train;
  if (t.global_batch_tokens > 0) {
    int64_t per_micro_step = int64_t(t.micro_batch_size) * t.seq_len * dp;
    if (t.global_batch_tokens % per_micro_step != 0) {
      int64_t below = t.global_batch_tokens / per_micro_step * per_micro_step;
      int64_t above = below + per_micro_step;
      std::string nearest = below > 0 ? fmt::format("{} and {}", below, above) : std::to_string(above);
      throw_user_error("{}: key 'train.global_batch_tokens' ({}) must be a multiple of the tokens "
                       "in one micro-step over all ranks, micro_batch_size × seq_len × (world size "
                       "/ parallel.sequence) = {} × {} × ({} / {}) = {}: nearest valid values are {}",
                       c.source, t.global_batch_tokens, t.micro_batch_size, t.seq_len, world_size,
                       P, per_micro_step, nearest);
    }
  }
}

std::vector<std::string> inert_at_start(const Config& c, bool cuda, bool nccl, int world_size) {
  std::vector<std::string> notes;
  const RuntimeConfig& r = c.runtime;
  if (!cuda && r.attention != "auto")
    notes.push_back(fmt::format("runtime.attention '{}' has no effect: the job runs on the CPU (runtime.device {}), "
                                "whose attention is the fp32 reference",
                                r.attention, r.device));
  if (world_size == 1 && c.parallel.zero_stage > 0)
    notes.push_back(fmt::format("parallel.zero_stage {} saves no memory on 1 rank: each shard is the whole buffer",
                                c.parallel.zero_stage));
  if (cuda && !nccl && r.overlap_comm)
    notes.push_back("runtime.overlap_comm has no effect on the staged MPI backend (ranks sharing a GPU, or "
                    "parallel.backend: mpi): each collective blocks the host, so nothing overlaps");
  if (cuda && !nccl && r.all_to_all_chunks > 1 && sequence_degree(c) > 1)
    notes.push_back(fmt::format("runtime.all_to_all_chunks {} overlaps nothing on the staged MPI backend: each "
                                "chunk's exchange blocks the host (the results are the same)",
                                r.all_to_all_chunks));
  return notes;
}

std::string to_yaml(const Config& c) {
  std::string source = c.source.empty() ? "<unknown>" : c.source;
  std::replace(source.begin(), source.end(), '\n', ' ');  // keep the comment on one line
  std::string out = fmt::format("# ulysses config, fully resolved from {}\n", source);
  for (std::string note : c.notes) {
    std::replace(note.begin(), note.end(), '\n', ' ');
    out += "# note: " + note + "\n";
  }
  std::string group;
  for (const Field& f : config_fields()) {
    if (f.group() != group) {
      group = f.group();
      out += group + ":\n";
    }
    out += fmt::format("  {}: {}\n", f.leaf(), format_value(f, c));
  }
  return out;
}

}  // namespace ulysses
