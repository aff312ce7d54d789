// The bad-input catalogue: every malformed input a user can hand to `ulysses` must end in a
// clear message (naming the file, key or line and what was expected) and the documented exit
// code (2), never a crash, a hang or a silent success. Each row of kCases runs the real
// executable in a child process (posix fork + exec, 60 s limit) and checks exit code + message.
//
// Inputs are made once in a scratch directory: configs, llm.c token shards, a real checkpoint
// (from a 1-step run) and damaged copies of it whose manifest is re-hashed, so the damage gets
// past the checksum and reaches the reader's own checks; llm.c files; GPT-2 tokenizer files.
//
// Permission cases: we run as root, who may read anything, so the child drops to uid/gid 65534
// (nobody) before exec; when that user cannot run the executable (e.g. a build directory that
// is not world-readable) those cases are reported as skipped, never passed.
// Disk full: the child ignores SIGXFSZ and runs under RLIMIT_FSIZE, so a checkpoint write fails
// with EFBIG, as it would on a full disk; /dev/full gives ENOSPC for the metrics file.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "core/data.h"

namespace fs = std::filesystem;

namespace {

struct Case {
  const char* name;
  std::vector<std::string> args;  // after the executable; "@W" is replaced by the scratch dir
  int exit_code;
  std::string message;            // must appear in stderr ("@W" replaced)
  bool as_nobody = false;         // run as uid/gid 65534
  long fsize_limit = 0;           // RLIMIT_FSIZE in bytes; 0: none
  int ranks = 0;                  // > 0: under mpirun -np ranks
};

struct Result {
  int code = -1;
  bool timed_out = false;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

Result spawn(const std::vector<std::string>& argv, const fs::path& out_prefix, bool as_nobody, long fsize_limit) {
  const std::string out_path = out_prefix.string() + ".out", err_path = out_prefix.string() + ".err";
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0) _exit(120);
    dup2(o, 1);
    dup2(e, 2);
    if (fsize_limit > 0) {
      signal(SIGXFSZ, SIG_IGN);  // a write past the limit fails with EFBIG instead of killing
      rlimit r{rlim_t(fsize_limit), rlim_t(fsize_limit)};
      setrlimit(RLIMIT_FSIZE, &r);
    }
    if (as_nobody && (setgroups(0, nullptr) != 0 || setgid(65534) != 0 || setuid(65534) != 0)) _exit(121);
    execv(cargv[0], cargv.data());
    _exit(127);
  }
  Result r;
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(60)) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      r.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  return r;
}

// --- fixtures -------------------------------------------------------------------------------------

std::string shard_bytes(int32_t magic, int32_t version, int32_t count, const std::vector<uint16_t>& tokens) {
  std::vector<int32_t> header(256, 0);
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::string s(reinterpret_cast<const char*>(header.data()), 1024);
  s.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  return s;
}

// Rewrites a checkpoint's manifest.yaml with the current sizes and xxh64 of its files (the
// format of core/checkpoint.cpp), so a damaged file passes verify_checkpoint.
void rehash_manifest(const fs::path& ckpt) {
  std::string text = "step: 1\nfiles:\n";
  for (const char* f : {"model.bin", "optimizer.bin", "state.yaml"}) {
    const std::string data = slurp(ckpt / f);
    text += fmt::format("  {}:\n    bytes: {}\n    xxh64: {:016x}\n", f, data.size(), XXH64(data.data(), data.size(), 0));
  }
  write_text(ckpt / "manifest.yaml", text);
}

fs::path copy_checkpoint(const fs::path& good, const fs::path& dst) {
  fs::remove_all(dst);
  fs::copy(good, dst, fs::copy_options::recursive);
  return dst;
}

// Model options of the checkpoint fixture: small and quick.
const std::vector<std::string> kTiny = {"--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set",
                                        "model.n_head=4", "--set", "model.max_seq_len=32", "--set",
                                        "train.seq_len=32", "--set", "train.micro_batch_size=1", "--set",
                                        "runtime.threads=1", "--set", "train.max_steps=1", "--set",
                                        "logging.level=warn", "--set", "train.warmup_steps=0"};

std::vector<std::string> train(std::vector<std::string> extra) {
  std::vector<std::string> a = {"train"};
  a.insert(a.end(), kTiny.begin(), kTiny.end());
  for (const std::string& s : extra) {
    a.push_back("--set");
    a.push_back(s);
  }
  return a;
}

void make_fixtures(const fs::path& w) {
  fs::create_directories(w / "cfg");
  fs::create_directories(w / "out");
  fs::create_directories(w / "empty_dir");
  fs::permissions(w, fs::perms(0755));
  auto cfg = [&](const char* name, const std::string& text) { write_text(w / "cfg" / name, text); };
  cfg("syntax.yaml", "model:\n  n_layer: [1, 2\n");
  cfg("tab.yaml", "model:\n\tn_layer: 2\n");
  cfg("unknown_key.yaml", "data:\n  source: synthetic\ntrain:\n  lrr: 0.1\n");
  cfg("unknown_group.yaml", "modle:\n  n_layer: 2\n");
  cfg("type_int.yaml", "model:\n  n_layer: two\n");
  cfg("type_bool.yaml", "data:\n  shuffle: maybe\n");
  cfg("list_for_scalar.yaml", "train:\n  lr: [1, 2]\n");
  cfg("scalar_group.yaml", "model: 3\n");
  cfg("negative_lr.yaml", "train:\n  lr: -1\n");
  cfg("zero_stage.yaml", "parallel:\n  zero_stage: 7\n");
  cfg("enum.yaml", "model:\n  position_embedding: sinusoidal\n");
  cfg("heads.yaml", "model:\n  n_embd: 30\n  n_head: 4\n");
  cfg("moot_train.yaml", "data:\n  source: synthetic\n  train: [x.bin]\n");
  cfg("moot_rope_theta.yaml", "data:\n  source: synthetic\nmodel:\n  rope_theta: 500000\n");
  cfg("moot_keep_last.yaml", "data:\n  source: synthetic\ncheckpoint:\n  keep_last: 1\n");
  cfg("seq_len.yaml", "model:\n  max_seq_len: 64\ntrain:\n  seq_len: 128\n");
  cfg("interval.yaml", "data:\n  source: synthetic\ncheckpoint:\n  interval: 5\n");
  cfg("duplicate.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n");
  cfg("top_list.yaml", "- model\n- train\n");
  cfg("shards_missing.yaml", "data:\n  source: shards\n");
  cfg("overflow.yaml", "model:\n  n_layer: 99999999999999999999\n");
  cfg("nan_lr.yaml", "train:\n  lr: .nan\n");
  cfg("binary.yaml", std::string("\x00\xff\xfe\x01model", 10));
  cfg("locked.yaml", "train:\n  lr: 0.1\n");
  fs::permissions(w / "cfg" / "locked.yaml", fs::perms::owner_read | fs::perms::owner_write);
  for (const auto& e : fs::directory_iterator(w / "cfg"))
    if (e.path().filename() != "locked.yaml") fs::permissions(e.path(), fs::perms(0644));
  fs::permissions(w / "cfg", fs::perms(0755));

  // token shards (vocabulary 256)
  std::vector<uint16_t> good(5000);
  for (size_t i = 0; i < good.size(); ++i) good[i] = uint16_t((i * 7) % 256);
  ulysses::write_token_shard((w / "good.bin").string(), good);
  write_text(w / "bad_magic.bin", shard_bytes(12345, 1, 5000, good));
  write_text(w / "bad_version.bin", shard_bytes(20240520, 9, 5000, good));
  write_text(w / "short_header.bin", std::string(100, '\0'));
  write_text(w / "zero_bytes.bin", "");
  write_text(w / "truncated.bin", shard_bytes(20240520, 1, 9000, good));
  write_text(w / "oversized.bin", shard_bytes(20240520, 1, 1000, good));
  write_text(w / "empty_count.bin", shard_bytes(20240520, 1, 0, {}));
  std::vector<uint16_t> beyond = good;
  beyond[1234] = 300;
  write_text(w / "beyond_vocab.bin", shard_bytes(20240520, 1, 5000, beyond));
  write_text(w / "tiny.bin", shard_bytes(20240520, 1, 10, std::vector<uint16_t>(10, 1)));
  write_text(w / "locked.bin", shard_bytes(20240520, 1, 5000, good));
  fs::permissions(w / "locked.bin", fs::perms::owner_read | fs::perms::owner_write);
  fs::create_directories(w / "shard_dir.bin");

  // llm.c checkpoints: wrong magic, truncated
  std::vector<int32_t> llmc(256, 0);
  llmc[0] = 20240326;
  llmc[1] = 3;
  llmc[2] = 32;   // max_seq_len
  llmc[3] = 256;  // vocab_size
  llmc[4] = 1;    // num_layers
  llmc[5] = 4;    // num_heads
  llmc[6] = 32;   // channels
  llmc[7] = 256;  // padded_vocab_size
  std::string llmc_text(reinterpret_cast<const char*>(llmc.data()), 1024);
  write_text(w / "llmc_truncated.bin", llmc_text + std::string(4000, '\0'));
  llmc[0] = 777;
  write_text(w / "llmc_magic.bin", std::string(reinterpret_cast<const char*>(llmc.data()), 1024) + std::string(4000, '\0'));

  // GPT-2 tokenizer directories
  fs::create_directories(w / "tok_json");
  write_text(w / "tok_json" / "encoder.json", "{\"a\": 0, \"b\" 1}");
  write_text(w / "tok_json" / "vocab.bpe", "#version: 0.2\n");
  fs::create_directories(w / "tok_merges");
  // GPT-2's byte-level alphabet: printable bytes stand for themselves, the other bytes for
  // U+0100.. in order; JSON-escaped as \uXXXX so the file is plain ASCII
  std::string enc = "{";
  for (int b = 0, extra = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const int code = printable ? b : 256 + extra++;
    enc += fmt::format("{}\"\\u{:04x}\": {}", b ? ", " : "", code, b);
  }
  enc += "}";
  write_text(w / "tok_merges" / "encoder.json", enc);
  write_text(w / "tok_merges" / "vocab.bpe", "#version: 0.2\na b c\n");
  write_text(w / "input.txt", "hello world\n");

  // paths
  write_text(w / "a_file", "x");
  fs::create_directories(w / "locked_dir");
  fs::permissions(w / "locked_dir", fs::perms(0555));
}

// A real checkpoint from a 1-step run, and damaged copies of it.
void make_checkpoints(const fs::path& w) {
  const Result r = spawn([&] {
    std::vector<std::string> a = {ULYSSES_EXE};
    for (const std::string& s : train({"data.source=synthetic", "checkpoint.dir=" + (w / "ckpt").string(),
                                       "checkpoint.export_hf=" + (w / "hf_good").string()}))
      a.push_back(s);
    return a;
  }(), w / "out" / "fixture_checkpoint", false, 0);
  INFO(r.err);
  REQUIRE(r.code == 0);
  const fs::path good = w / "ckpt" / "step_00000001";
  REQUIRE(fs::exists(good / "manifest.yaml"));

  copy_checkpoint(good, w / "ck_no_manifest");
  fs::remove(w / "ck_no_manifest" / "manifest.yaml");
  {
    const fs::path c = copy_checkpoint(good, w / "ck_checksum");
    std::fstream f(c / "model.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(500);
    f.put('\x55');
  }
  {
    const fs::path c = copy_checkpoint(good, w / "ck_magic");
    std::fstream f(c / "model.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.put('\x01');
    f.close();
    rehash_manifest(c);
  }
  {
    const fs::path c = copy_checkpoint(good, w / "ck_version");
    std::fstream f(c / "optimizer.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8);
    f.put('\x09');
    f.close();
    rehash_manifest(c);
  }
  {
    const fs::path c = copy_checkpoint(good, w / "ck_truncated");
    fs::resize_file(c / "model.bin", fs::file_size(c / "model.bin") / 2);
    rehash_manifest(c);
  }
  {
    const fs::path c = copy_checkpoint(good, w / "ck_layout");
    std::string st = slurp(c / "state.yaml");
    st = replace_all(st, "world_size: 1", "world_size: 4");
    st = replace_all(st, "sequence_parallel: 1", "sequence_parallel: 3");
    write_text(c / "state.yaml", st);
    rehash_manifest(c);
  }
  {
    const fs::path c = copy_checkpoint(good, w / "ck_state_garbage");
    write_text(c / "state.yaml", "step: [unclosed\n");
    rehash_manifest(c);
  }
  {
    const fs::path c = copy_checkpoint(good, w / "ck_manifest_garbage");
    write_text(c / "manifest.yaml", "files: {model.bin: [\n");
  }
  // Hugging Face exports (core/hf.h) of the same run, damaged: an activation ulysses lacks, a
  // truncated model.safetensors, a header that is not JSON
  REQUIRE(fs::exists(w / "hf_good" / "model.safetensors"));
  {
    const fs::path c = copy_checkpoint(w / "hf_good", w / "hf_relu");
    write_text(c / "config.json", replace_all(slurp(c / "config.json"), "\"gelu_new\"", "\"relu\""));
  }
  {
    const fs::path c = copy_checkpoint(w / "hf_good", w / "hf_truncated");
    fs::resize_file(c / "model.safetensors", fs::file_size(c / "model.safetensors") / 2);
  }
  {
    const fs::path c = copy_checkpoint(w / "hf_good", w / "hf_not_json");
    write_text(c / "model.safetensors", std::string("\x0a\0\0\0\0\0\0\0", 8) + "not json!!" + std::string(64, '\0'));
  }
  // for the disk-full case: a checkpoint directory holding a good checkpoint of step 1
  fs::create_directories(w / "full_disk");
}

std::vector<Case> cases() {
  const std::string synth = "data.source=synthetic";
  std::vector<Case> c;
  auto add = [&](const char* name, std::vector<std::string> args, int code, std::string msg) {
    c.push_back({name, std::move(args), code, std::move(msg)});
    return &c.back();
  };
  auto cfg = [](const char* file) { return std::vector<std::string>{"train", "--config", std::string("@W/cfg/") + file}; };
  auto shard = [&](const std::string& path) { return train({"data.source=shards", "data.train=" + path}); };

  // YAML: syntax, unknown keys, types, ranges, conflicts
  add("yaml: syntax error", cfg("syntax.yaml"), 2, "@W/cfg/syntax.yaml:3:1: invalid YAML");
  add("yaml: tab indentation", cfg("tab.yaml"), 2, "@W/cfg/tab.yaml:2:9: invalid YAML");
  add("yaml: unknown key", cfg("unknown_key.yaml"), 2, "@W/cfg/unknown_key.yaml:4:3: unknown key 'train.lrr' (did you mean 'train.lr'?)");
  add("yaml: unknown group", cfg("unknown_group.yaml"), 2, "unknown key 'modle' (did you mean 'model'?)");
  add("yaml: word for an integer", cfg("type_int.yaml"), 2, "key 'model.n_layer': expected an integer >= 1");
  add("yaml: word for a bool", cfg("type_bool.yaml"), 2, "key 'data.shuffle': expected true or false");
  add("yaml: list for a number", cfg("list_for_scalar.yaml"), 2, "key 'train.lr': expected a positive number");
  add("yaml: number for a group", cfg("scalar_group.yaml"), 2, "key 'model': expected a map of model keys");
  add("yaml: negative learning rate", cfg("negative_lr.yaml"), 2, "key 'train.lr': expected a positive number, got '-1'");
  add("yaml: zero stage out of range", cfg("zero_stage.yaml"), 2, "key 'parallel.zero_stage': expected an integer in 0..3");
  add("yaml: unknown choice", cfg("enum.yaml"), 2, "key 'model.position_embedding': expected one of learned, rope");
  add("yaml: width not divisible by heads", cfg("heads.yaml"), 2, "key 'model.n_embd' (30) must be divisible by model.n_head (4)");
  add("yaml: sequence longer than the model", cfg("seq_len.yaml"), 2, "key 'train.seq_len' (128) must be <= model.max_seq_len (64)");
  add("yaml: checkpoint interval without dir", cfg("interval.yaml"), 2, "key 'checkpoint.interval' (5) needs checkpoint.dir");
  add("yaml: duplicate key", cfg("duplicate.yaml"), 2, "key 'train.lr' appears twice");
  add("yaml: a list at the top level", cfg("top_list.yaml"), 2, "expected a map of groups");
  add("yaml: shards without data.train", cfg("shards_missing.yaml"), 2, "key 'data.train' is required when data.source is 'shards'");
  add("yaml: integer overflow", cfg("overflow.yaml"), 2, "key 'model.n_layer': expected an integer >= 1");
  add("yaml: NaN learning rate", cfg("nan_lr.yaml"), 2, "key 'train.lr': expected a positive number");
  add("yaml: binary junk", cfg("binary.yaml"), 2, "@W/cfg/binary.yaml");
  add("config: missing file", cfg("none.yaml"), 2, "@W/cfg/none.yaml: cannot open the config file: No such file or directory");
  add("config: a directory", {"train", "--config", "@W/cfg"}, 2, "@W/cfg: is a directory, expected a YAML config file");
  // command line
  add("cli: --set without '='", train({"train.lr"}), 2, "--set train.lr: expected key.path=value");
  add("cli: --set unknown key", train({"train.lrr=1"}), 2, "unknown key 'train.lrr' (did you mean 'train.lr'?)");
  add("cli: --set a group", train({"train=1"}), 2, "key 'train' is a group");
  add("cli: --set a word for a number", train({"train.max_steps=abc"}), 2, "key 'train.max_steps': expected an integer >= 0, got 'abc'");
  add("cli: unknown option", {"train", "--frobnicate"}, 2, "--frobnicate");
  add("cli: no subcommand", {}, 2, "subcommand");
  add("cli: unknown subcommand", {"trian"}, 2, "unknown subcommand 'trian': expected one of train, check");
  add("cli: bad --log-level", {"train", "--log-level", "loud"}, 2, "--log-level");
  add("cli: prepare --val-fraction 2", {"prepare", "@W/input.txt", "--out", "@W/p", "--val-fraction", "2"}, 2, "--val-fraction");
  add("cli: sequence does not divide 1 rank", train({"parallel.sequence=2", synth}), 2,
      "key 'parallel.sequence' (2) must divide the world size (1 ranks)");
  c.push_back({"cli: mpirun -np 2, sequence 4", train({"parallel.sequence=4", synth}), 2,
               "key 'parallel.sequence' (4) must divide the world size (2 ranks)", false, 0, 2});
  c.push_back({"cli: mpirun -np 2, unknown key", train({"train.lrr=1"}), 2, "unknown key 'train.lrr'", false, 0, 2});
  // keys that another key makes moot (docs/configs.md, "Keys without effect")
  add("moot: data.train under data.source synthetic (file)", cfg("moot_train.yaml"), 2,
      "@W/cfg/moot_train.yaml:3:10: key 'data.train' has no effect, because data.source is 'synthetic' (random "
      "tokens; no file is read): set data.source: shards, or drop data.train");
  add("moot: data.train after --set data.source=synthetic", train({synth, "data.train=@W/x.bin"}), 2,
      "--set data.train=@W/x.bin: key 'data.train' has no effect, because data.source is 'synthetic'");
  add("moot: data.val alone over the synthetic default", train({"data.val=@W/x.bin"}), 2,
      "key 'data.val' has no effect, because data.source is 'synthetic' (random tokens; no file is read): set "
      "data.source: shards and list data.train too, or drop data.val");
  add("moot: data.shuffle with synthetic tokens", train({synth, "data.shuffle=true"}), 2,
      "key 'data.shuffle' has no effect, because data.source is 'synthetic'");
  add("moot: rope_theta with learned positions", cfg("moot_rope_theta.yaml"), 2,
      "@W/cfg/moot_rope_theta.yaml:4:15: key 'model.rope_theta' has no effect, because model.position_embedding is "
      "'learned'");
  add("moot: keep_last without checkpoint.dir", cfg("moot_keep_last.yaml"), 2,
      "key 'checkpoint.keep_last' has no effect, because checkpoint.dir is empty");
  add("moot: min_lr_ratio with a constant schedule", train({"train.lr_schedule=constant", "train.min_lr_ratio=0.5"}), 2,
      "key 'train.min_lr_ratio' has no effect, because train.lr_schedule is 'constant'");
  add("moot: sample_temperature without sample_tokens", train({"train.sample_temperature=0.5"}), 2,
      "key 'train.sample_temperature' has no effect, because train.sample_tokens is 0");
  add("moot: tokenizer_dir with the byte tokenizer", train({"train.sample_tokens=4", "data.tokenizer_dir=@W"}), 2,
      "key 'data.tokenizer_dir' has no effect, because data.tokenizer is 'byte'");
  add("moot: attention on the cpu", train({"runtime.device=cpu", "runtime.attention=flash"}), 2,
      "key 'runtime.attention' has no effect, because runtime.device is 'cpu'");
  add("moot: all_to_all_chunks without sequence parallelism", train({"runtime.all_to_all_chunks=2"}), 2,
      "key 'runtime.all_to_all_chunks' has no effect, because parallel.sequence is 1");
  add("moot: init_from when resume names a checkpoint",
      train({"checkpoint.resume=@W/ckpt/step_00000001", "checkpoint.init_from=@W/x.bin"}), 2,
      "key 'checkpoint.init_from' has no effect, because checkpoint.resume is '@W/ckpt/step_00000001'");
  add("moot: debug_inject_nan_steps without debug_inject_nan_step", train({"runtime.debug_inject_nan_steps=2"}), 2,
      "key 'runtime.debug_inject_nan_steps' has no effect, because runtime.debug_inject_nan_step is 0");
  add("moot: all_ranks at level warn", train({"logging.all_ranks=true"}), 2,  // kTiny sets logging.level=warn
      "key 'logging.all_ranks' has no effect, because logging.level is 'warn'");
  c.push_back({"moot: mpirun -np 2, data.train under synthetic", train({synth, "data.train=@W/x.bin"}), 2,
               "key 'data.train' has no effect", false, 0, 2});
  // token shards
  add("shard: wrong magic", shard("@W/bad_magic.bin"), 2, "@W/bad_magic.bin: not an llm.c token shard: magic is 12345, expected 20240520");
  add("shard: wrong version", shard("@W/bad_version.bin"), 2, "@W/bad_version.bin: unsupported token shard version 9, expected 1");
  add("shard: shorter than a header", shard("@W/short_header.bin"), 2, "@W/short_header.bin: too short for an llm.c shard header: 100 bytes");
  add("shard: empty file", shard("@W/zero_bytes.bin"), 2, "@W/zero_bytes.bin: too short for an llm.c shard header: 0 bytes");
  add("shard: truncated", shard("@W/truncated.bin"), 2, "@W/truncated.bin: truncated: the header says 9000 tokens");
  add("shard: size mismatch (oversized)", shard("@W/oversized.bin"), 2, "@W/oversized.bin: oversized: the header says 1000 tokens");
  add("shard: no tokens", shard("@W/empty_count.bin"), 2, "@W/empty_count.bin: the header says the shard holds 0 tokens");
  add("shard: token beyond the vocabulary", shard("@W/beyond_vocab.bin"), 2,
      "@W/beyond_vocab.bin: token 300 at index 1234 is out of range: model.vocab_size is 256");
  add("shard: too few tokens for a micro-step", shard("@W/tiny.bin"), 2, "data.train: the shards hold 0 sequences of 32 tokens");
  add("shard: glob matches nothing", shard("@W/nothing_*.bin"), 2, "the pattern '@W/nothing_*.bin' matches no file");
  add("shard: missing file", shard("@W/missing.bin"), 2, "@W/missing.bin");
  add("shard: a directory", shard("@W/shard_dir.bin"), 2, "@W/shard_dir.bin: is a directory, expected an llm.c token shard file");
  // checkpoints
  add("checkpoint: resume from a missing path", train({synth, "checkpoint.resume=@W/nope"}), 2,
      "checkpoint.resume: '@W/nope' is not a checkpoint directory");
  add("checkpoint: resume from a file", train({synth, "checkpoint.resume=@W/a_file"}), 2,
      "checkpoint.resume: '@W/a_file' is not a checkpoint directory");
  add("checkpoint: no manifest (interrupted save)", train({synth, "checkpoint.resume=@W/ck_no_manifest"}), 2,
      "manifest.yaml missing (an interrupted save?)");
  add("checkpoint: checksum mismatch", train({synth, "checkpoint.resume=@W/ck_checksum"}), 2,
      "model.bin: checksum mismatch");
  add("checkpoint: unreadable manifest", train({synth, "checkpoint.resume=@W/ck_manifest_garbage"}), 2,
      "manifest.yaml unreadable");
  add("checkpoint: wrong magic", train({synth, "checkpoint.resume=@W/ck_magic"}), 2,
      "@W/ck_magic/model.bin: not a ulysses checkpoint file (bad magic)");
  add("checkpoint: wrong version", train({synth, "checkpoint.resume=@W/ck_version"}), 2,
      "@W/ck_version/optimizer.bin: checkpoint version 9, this build reads 1");
  add("checkpoint: truncated", train({synth, "checkpoint.resume=@W/ck_truncated"}), 2,
      "@W/ck_truncated/model.bin: truncated");
  add("checkpoint: wrong shapes", train({synth, "checkpoint.resume=@W/ckpt/step_00000001", "model.n_embd=64"}), 2,
      "model.bin: model.n_embd is 32 in the checkpoint, the config says 64");
  add("checkpoint: impossible layout", train({synth, "checkpoint.resume=@W/ck_layout"}), 2,
      "@W/ck_layout/state.yaml: the recorded layout (world_size 4, sequence_parallel 3) is not a valid DP x SP layout");
  add("checkpoint: unreadable state.yaml", train({synth, "checkpoint.resume=@W/ck_state_garbage"}), 2,
      "@W/ck_state_garbage/state.yaml");
  add("checkpoint: resume auto without dir", train({synth, "checkpoint.resume=auto"}), 2,
      "checkpoint.resume 'auto' resumes from the newest checkpoint in checkpoint.dir, which is empty");
  add("llm.c: wrong magic", train({synth, "checkpoint.init_from=@W/llmc_magic.bin"}), 2,
      "@W/llmc_magic.bin: not an llm.c GPT-2 checkpoint: magic is 777, expected 20240326");
  add("llm.c: truncated", train({synth, "checkpoint.init_from=@W/llmc_truncated.bin"}), 2, "@W/llmc_truncated.bin: truncated");
  add("llm.c: missing", train({synth, "checkpoint.init_from=@W/none.bin"}), 2, "@W/none.bin: llm.c checkpoint not found");
  add("hf: activation ulysses lacks", train({synth, "checkpoint.init_from=@W/hf_relu"}), 2,
      "@W/hf_relu/config.json: activation_function is \"relu\", ulysses computes the tanh GELU only");
  add("hf: truncated safetensors", train({synth, "checkpoint.init_from=@W/hf_truncated"}), 2,
      "-byte data buffer");
  add("hf: header not JSON", train({synth, "checkpoint.init_from=@W/hf_not_json/model.safetensors"}), 2,
      "@W/hf_not_json/model.safetensors: the safetensors header is not valid JSON");
  add("hf: missing file", train({synth, "checkpoint.init_from=@W/none.safetensors"}), 2,
      "@W/none.safetensors: safetensors file not found");
  c.push_back({"hf: model disagrees, 2 ranks", train({synth, "checkpoint.init_from=@W/hf_good", "model.n_embd=64"}), 2,
               "@W/hf_good/config.json: n_embd is 32 in the checkpoint, model.n_embd is 64 in the config", false, 0, 2});
  add("hf: export of a RoPE model", train({synth, "model.position_embedding=rope", "checkpoint.export_hf=@W/hf_rope"}), 2,
      "model.position_embedding");
  c.push_back({"dump: two DP groups", {"dump", "--set", "data.source=synthetic", "--out", "@W/dump.safetensors"}, 2,
               "ulysses dump needs one data-parallel group (world size 2 = parallel.sequence 1)", false, 0, 2});
  // tokenizer files
  add("tokenizer: directory missing", {"prepare", "@W/input.txt", "--out", "@W/p1", "--tokenizer", "gpt2", "--tokenizer-dir", "@W/no_tok"}, 2,
      "@W/no_tok");
  add("tokenizer: empty directory", {"prepare", "@W/input.txt", "--out", "@W/p2", "--tokenizer", "gpt2", "--tokenizer-dir", "@W/empty_dir"}, 2,
      "@W/empty_dir: the GPT-2 tokenizer directory has no encoder.json or vocab.json");
  add("tokenizer: malformed encoder.json", {"prepare", "@W/input.txt", "--out", "@W/p3", "--tokenizer", "gpt2", "--tokenizer-dir", "@W/tok_json"}, 2,
      "@W/tok_json/encoder.json:1: expected ':' after the key, found '1'");
  add("tokenizer: malformed merges line", {"prepare", "@W/input.txt", "--out", "@W/p4", "--tokenizer", "gpt2", "--tokenizer-dir", "@W/tok_merges"}, 2,
      "@W/tok_merges/vocab.bpe:2: expected two tokens separated by one space");
  add("prepare: missing input", {"prepare", "@W/no_input.txt", "--out", "@W/p5"}, 2, "@W/no_input.txt");
  // paths
  add("path: checkpoint.dir is a file", train({synth, "checkpoint.dir=@W/a_file"}), 2, "@W/a_file");
  add("path: checkpoint.dir under a file", train({synth, "checkpoint.dir=@W/a_file/ckpt"}), 2, "@W/a_file/ckpt");
  add("path: metrics file in a missing directory", train({synth, "logging.metrics_file=@W/no/such/m.jsonl"}), 2,
      "logging.metrics_file '@W/no/such/m.jsonl': cannot open for writing: No such file or directory");
  add("disk full: metrics file on /dev/full", train({synth, "logging.metrics_file=/dev/full"}), 2,
      "logging.metrics_file '/dev/full': write failed: No space left on device");
  c.push_back({"disk full: checkpoint save over RLIMIT_FSIZE", train({synth, "checkpoint.dir=@W/full_disk", "model.n_layer=2", "model.n_embd=256"}), 2,
               "optimizer.bin: write failed: File too large", false, 8 << 20});
  c.push_back({"permission: config file", cfg("locked.yaml"), 2,
               "@W/cfg/locked.yaml: cannot open the config file: Permission denied", true});
  c.push_back({"permission: token shard", shard("@W/locked.bin"), 2, "@W/locked.bin: cannot open token shard: Permission denied",
               true});
  c.push_back({"permission: checkpoint.dir", train({synth, "checkpoint.dir=@W/locked_dir/ckpt"}), 2, "Permission denied",
               true});
  return c;
}

}  // namespace

TEST_CASE("the bad-input catalogue: every malformed input is a clear error with exit code 2", "[badinput]") {
  const fs::path w = fs::temp_directory_path() / ("ulysses_badinput_" + std::to_string(::getpid()));
  fs::remove_all(w);
  make_fixtures(w);
  make_checkpoints(w);

  // Can uid 65534 run the executable at all? If not, the permission cases are skipped.
  const Result probe = spawn({ULYSSES_EXE, "--version"}, w / "out" / "probe_nobody", true, 0);
  const bool nobody_ok = probe.code == 0;
  if (!nobody_ok) WARN("uid 65534 cannot run " << ULYSSES_EXE << " (exit " << probe.code << "): permission cases skipped");

  int passed = 0, failed = 0, skipped = 0, index = 0;
  for (const Case& k : cases()) {
    ++index;
    if (k.as_nobody && !nobody_ok) {
      ++skipped;
      continue;
    }
    std::vector<std::string> argv;
    if (k.ranks > 0) argv = {MPIEXEC, "--oversubscribe", "-np", std::to_string(k.ranks)};
    argv.push_back(ULYSSES_EXE);
    for (const std::string& a : k.args) argv.push_back(replace_all(a, "@W", w.string()));
    const Result r = spawn(argv, w / "out" / fmt::format("case_{:02d}", index), k.as_nobody, k.fsize_limit);
    const std::string want = replace_all(k.message, "@W", w.string());
    const bool ok = !r.timed_out && r.code == k.exit_code && r.err.find(want) != std::string::npos &&
                    r.err.find("internal error") == std::string::npos;
    INFO("case " << index << ": " << k.name << "\n  exit " << r.code << (r.timed_out ? " (timed out)" : "")
                 << "\n  expected message: " << want << "\n  stderr: " << r.err << "\n  stdout: " << r.out);
    CHECK(ok);
    (ok ? passed : failed) += 1;
  }
  // the disk-full save left no half checkpoint under a real name
  for (const auto& e : fs::directory_iterator(w / "full_disk"))
    CHECK(e.path().filename().string().rfind("step_", 0) != 0);
  fmt::print("bad-input catalogue: {} cases, {} passed, {} failed, {} skipped (permission cases need uid 65534)\n",
             index, passed, failed, skipped);
  CHECK(index >= 40);
  if (failed == 0) fs::remove_all(w);
}
