// Crash-safe checkpoints (see core/checkpoint.h).
#include "core/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "core/base/error.h"
#include "core/fileio.h"

namespace fs = std::filesystem;

namespace ulysses {

namespace {

constexpr int64_t kMagic = 0x31534553594c55;  // "ULYSES1" little-endian
constexpr int64_t kVersion = 1;
constexpr int kHeaderWords = 16;
enum : int64_t { kModelFile = 1, kOptimizerFile = 2 };

std::string step_name(int step) { return fmt::format("step_{:08d}", step); }

// Writes the buffers one after another into `path` and fsyncs it.
void write_file(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts) {
  write_file_synced(path, [&](int fd, const std::string& p) {
    for (const auto& [data, bytes] : parts) write_all(fd, data, bytes, p);
  });
}

std::array<int64_t, kHeaderWords> make_header(int64_t kind, const GPTShape& s, int64_t n) {
  std::array<int64_t, kHeaderWords> h{};
  h[0] = kMagic;
  h[1] = kVersion;
  h[2] = kind;
  h[3] = n;
  h[4] = s.L;
  h[5] = s.C;
  h[6] = s.Hq;
  h[7] = s.Hkv;
  h[8] = s.Vp;
  h[9] = s.rope ? 0 : s.maxT;
  h[10] = s.rope;
  return h;
}

uint64_t hash_file(const std::string& path, uint64_t* size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_user_error("{}: cannot open: {}", path, std::strerror(errno));
  XXH64_state_t* st = XXH64_createState();
  XXH64_reset(st, 0);
  std::vector<char> buf(1 << 20);
  uint64_t total = 0;
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    const std::streamsize got = in.gcount();
    if (got > 0) XXH64_update(st, buf.data(), size_t(got));
    total += uint64_t(got);
  }
  const uint64_t h = XXH64_digest(st);
  XXH64_freeState(st);
  *size = total;
  return h;
}

const char* kFiles[] = {"model.bin", "optimizer.bin", "state.yaml"};

}  // namespace

std::string save_checkpoint(const std::string& dir, const Config& cfg, const GPTShape& shape, const TrainState& state,
                            const float* params, const float* m, const float* v, int64_t n) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw_user_error("checkpoint.dir '{}': cannot create: {}", dir, ec.message());
  const std::string name = step_name(state.step);
  const std::string tmp = (fs::path(dir) / (".tmp-" + name)).string();
  const std::string final_path = (fs::path(dir) / name).string();
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  if (ec) throw_user_error("checkpoint '{}': cannot create: {}", tmp, ec.message());
  try {
    const size_t bytes = size_t(n) * sizeof(float);
    auto mh = make_header(kModelFile, shape, n);
    write_file(tmp + "/model.bin", {{mh.data(), sizeof(mh)}, {params, bytes}});
    auto oh = make_header(kOptimizerFile, shape, n);
    write_file(tmp + "/optimizer.bin", {{oh.data(), sizeof(oh)}, {m, bytes}, {v, bytes}});

    YAML::Emitter st;
    st << YAML::BeginMap;
    st << YAML::Key << "step" << YAML::Value << state.step;
    st << YAML::Key << "data_epoch" << YAML::Value << state.data.epoch;
    st << YAML::Key << "data_next_sequence" << YAML::Value << state.data.next_sequence;
    st << YAML::Key << "skipped_in_a_row" << YAML::Value << state.skipped_in_a_row;
    st << YAML::Key << "world_size" << YAML::Value << state.world_size;
    st << YAML::Key << "sequence_parallel" << YAML::Value << state.sequence_parallel;
    st << YAML::Key << "zero_stage" << YAML::Value << state.zero_stage;
    st << YAML::Key << "config" << YAML::Value << YAML::Literal << to_yaml(cfg);
    st << YAML::EndMap;
    const std::string text = std::string(st.c_str()) + "\n";
    write_file(tmp + "/state.yaml", {{text.data(), text.size()}});

    YAML::Emitter man;
    man << YAML::BeginMap << YAML::Key << "step" << YAML::Value << state.step;
    man << YAML::Key << "files" << YAML::Value << YAML::BeginMap;
    for (const char* f : kFiles) {
      uint64_t size = 0;
      const uint64_t h = hash_file(tmp + "/" + f, &size);
      man << YAML::Key << f << YAML::Value << YAML::BeginMap << YAML::Key << "bytes" << YAML::Value << size
          << YAML::Key << "xxh64" << YAML::Value << fmt::format("{:016x}", h) << YAML::EndMap;
    }
    man << YAML::EndMap << YAML::EndMap;
    const std::string mtext = std::string(man.c_str()) + "\n";
    write_file(tmp + "/manifest.yaml", {{mtext.data(), mtext.size()}});
    fsync_directory(tmp);
    // publish: an older checkpoint of the same step (a rerun) is replaced
    if (fs::exists(final_path)) fs::remove_all(final_path);
    if (std::rename(tmp.c_str(), final_path.c_str()) != 0)
      throw_user_error("checkpoint '{}': rename to '{}' failed: {}", tmp, final_path, std::strerror(errno));
    fsync_directory(dir);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }

  // keep the newest keep_last complete checkpoints
  if (cfg.checkpoint.keep_last > 0) {
    std::vector<std::string> all;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) all.push_back(e.path().string());
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i + size_t(cfg.checkpoint.keep_last) < all.size(); ++i) fs::remove_all(all[i], ec);
  }
  return final_path;
}

std::string verify_checkpoint(const std::string& path) {
  const std::string manifest = path + "/manifest.yaml";
  if (!fs::exists(manifest)) return "manifest.yaml missing (an interrupted save?)";
  YAML::Node man;
  try {
    man = YAML::LoadFile(manifest);
  } catch (const YAML::Exception& e) {
    return fmt::format("manifest.yaml unreadable: {}", e.what());
  }
  if (!man.IsMap() || !man["files"] || !man["files"].IsMap()) return "manifest.yaml has no 'files' map";
  for (const char* f : kFiles) {
    const YAML::Node entry = man["files"][f];
    if (!entry || !entry.IsMap()) return fmt::format("manifest.yaml does not list {}", f);
    const std::string file = path + "/" + f;
    if (!fs::exists(file)) return fmt::format("{} missing", f);
    uint64_t size = 0;
    uint64_t h = 0;
    try {
      h = hash_file(file, &size);
    } catch (const UserError& e) {
      return e.what();
    }
    if (size != entry["bytes"].as<uint64_t>(0))
      return fmt::format("{}: {} bytes, the manifest says {}", f, size, entry["bytes"].as<uint64_t>(0));
    if (fmt::format("{:016x}", h) != entry["xxh64"].as<std::string>(""))
      return fmt::format("{}: checksum mismatch (xxh64 {:016x}, the manifest says {})", f, h,
                         entry["xxh64"].as<std::string>(""));
  }
  return "";
}

std::optional<std::string> find_latest_checkpoint(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  std::vector<std::string> all;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) all.push_back(e.path().string());
  std::sort(all.rbegin(), all.rend());
  for (const std::string& c : all) {
    const std::string problem = verify_checkpoint(c);
    if (problem.empty()) return c;
    spdlog::warn("skipping checkpoint {}: {}", c, problem);
  }
  return std::nullopt;
}

std::optional<std::string> resolve_resume(const CheckpointConfig& c) {
  if (c.resume.empty()) return std::nullopt;
  if (c.resume == "auto") {
    if (c.dir.empty()) throw_user_error("checkpoint.resume: 'auto' needs checkpoint.dir to be set");
    return find_latest_checkpoint(c.dir);
  }
  if (!fs::is_directory(c.resume)) throw_user_error("checkpoint.resume: '{}' is not a checkpoint directory", c.resume);
  const std::string problem = verify_checkpoint(c.resume);
  if (!problem.empty()) throw_user_error("checkpoint.resume: '{}' is not a valid checkpoint: {}", c.resume, problem);
  return c.resume;
}

namespace {

void read_payload(const std::string& path, int64_t kind, const GPTShape& shape, int64_t n,
                  const std::vector<float*>& outs) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_user_error("{}: cannot open: {}", path, std::strerror(errno));
  std::array<int64_t, kHeaderWords> h{};
  in.read(reinterpret_cast<char*>(h.data()), sizeof(h));
  if (in.gcount() != std::streamsize(sizeof(h))) throw_user_error("{}: truncated header", path);
  if (h[0] != kMagic) throw_user_error("{}: not a ulysses checkpoint file (bad magic)", path);
  if (h[1] != kVersion) throw_user_error("{}: checkpoint version {}, this build reads {}", path, h[1], kVersion);
  if (h[2] != kind) throw_user_error("{}: wrong kind of checkpoint file", path);
  const auto want = make_header(kind, shape, n);
  const char* fields[] = {"", "", "", "parameter count", "model.n_layer", "model.n_embd", "model.n_head",
                          "model.n_kv_head", "padded vocabulary", "model.max_seq_len (position rows)",
                          "model.position_embedding (rope)"};
  for (int i : {4, 5, 6, 7, 8, 9, 10, 3})  // the model's fields first: they say what differs
    if (h[i] != want[i])
      throw_user_error("{}: {} is {} in the checkpoint, the config says {}", path, fields[i], h[i], want[i]);
  for (float* out : outs) {
    std::vector<float> skip;
    char* dst = reinterpret_cast<char*>(out);
    if (!out) {
      skip.resize(size_t(n));
      dst = reinterpret_cast<char*>(skip.data());
    }
    in.read(dst, std::streamsize(n * 4));
    if (in.gcount() != std::streamsize(n * 4)) throw_user_error("{}: truncated (expected {} floats)", path, n);
  }
}

}  // namespace

TrainState load_checkpoint(const std::string& path, const GPTShape& shape, float* params, float* m, float* v,
                           int64_t n) {
  read_payload(path + "/model.bin", kModelFile, shape, n, {params});
  if (m || v) read_payload(path + "/optimizer.bin", kOptimizerFile, shape, n, {m, v});
  TrainState s;
  const std::string state_path = path + "/state.yaml";
  try {
    YAML::Node st = YAML::LoadFile(state_path);
    s.step = st["step"].as<int>();
    s.data.epoch = st["data_epoch"].as<uint64_t>();
    s.data.next_sequence = st["data_next_sequence"].as<uint64_t>();
    s.skipped_in_a_row = st["skipped_in_a_row"].as<int>(0);
    s.world_size = st["world_size"].as<int>(1);
    s.sequence_parallel = st["sequence_parallel"].as<int>(1);
    s.zero_stage = st["zero_stage"].as<int>(0);
  } catch (const YAML::Exception& e) {
    throw_user_error("{}: {}", state_path, e.what());
  }
  return s;
}

}  // namespace ulysses
