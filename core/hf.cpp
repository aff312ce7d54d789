// Hugging Face GPT-2 checkpoints (core/hf.h): the safetensors reader and writer, config.json,
// and the mapping between HF's tensors and ulysses' llm.c-ordered parameters (core/llmc.h).
#include "core/hf.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/base/error.h"
#include "core/fileio.h"
#include "core/llmc.h"

namespace ulysses {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderBytes = uint64_t(100) << 20;  // safetensors' own limit: 100 MB

// Bytes per element of the dtypes safetensors defines; 0 for an unknown name.
size_t dtype_bytes(const std::string& d) {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2},
      {"U16", 2},  {"F16", 2}, {"BF16", 2}, {"I32", 4},    {"U32", 4},     {"F32", 4},
      {"I64", 8},  {"U64", 8}, {"F64", 8}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

float bf16_to_f32(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_f32(uint16_t h) {  // IEEE half: 1 sign, 5 exponent, 10 mantissa bits
  const uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else {
    const float v = std::ldexp(float(man), -24);  // subnormal or zero: man * 2^-24
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_user_error("{}: cannot open {}", path, what);
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw_user_error("{}: read failed", path);
  return ss.str();
}

// The HF name of each llm.c tensor: stacked ones with "{}" for the layer; transposed: Conv1D.
struct HfName {
  const char* llmc;
  const char* hf;
  bool per_layer;
  bool transposed;
};
constexpr HfName kHfNames[kLlmcNumTensors] = {
    {"wte", "transformer.wte.weight", false, false},
    {"wpe", "transformer.wpe.weight", false, false},
    {"ln1w", "transformer.h.{}.ln_1.weight", true, false},
    {"ln1b", "transformer.h.{}.ln_1.bias", true, false},
    {"qkvw", "transformer.h.{}.attn.c_attn.weight", true, true},
    {"qkvb", "transformer.h.{}.attn.c_attn.bias", true, false},
    {"attprojw", "transformer.h.{}.attn.c_proj.weight", true, true},
    {"attprojb", "transformer.h.{}.attn.c_proj.bias", true, false},
    {"ln2w", "transformer.h.{}.ln_2.weight", true, false},
    {"ln2b", "transformer.h.{}.ln_2.bias", true, false},
    {"fcw", "transformer.h.{}.mlp.c_fc.weight", true, true},
    {"fcb", "transformer.h.{}.mlp.c_fc.bias", true, false},
    {"fcprojw", "transformer.h.{}.mlp.c_proj.weight", true, true},
    {"fcprojb", "transformer.h.{}.mlp.c_proj.bias", true, false},
    {"lnfw", "transformer.ln_f.weight", false, false},
    {"lnfb", "transformer.ln_f.bias", false, false},
};

std::string hf_name(const HfName& n, int layer) {
  return n.per_layer ? fmt::format(fmt::runtime(n.hf), layer) : std::string(n.hf);
}

// One llm.c tensor's slice (a layer of a stacked one) as HF lays it out: its shape there.
// rows x cols in ulysses ([out, in] for weights); HF's Conv1D shape is [cols, rows].
std::vector<int64_t> hf_shape(const LlmcTensor& t, const HfName& n, int V) {
  std::vector<int64_t> s(t.shape.begin() + (n.per_layer ? 1 : 0), t.shape.end());
  if (std::string(n.llmc) == "wte") s[0] = V;  // padding rows are not in HF's file
  if (n.transposed) std::swap(s[0], s[1]);
  return s;
}

// Reads one whole value of `key` from config.json as a positive int.
int positive_int(const json& j, const char* key, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end()) throw_user_error("{}: missing field \"{}\" (a positive integer)", path, key);
  if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > std::numeric_limits<int>::max())
    throw_user_error("{}: field \"{}\" is {}, expected a positive integer", path, key, it->dump());
  return int(it->get<int64_t>());
}

// The (name -> entry) lookup with or without the "transformer." prefix.
const SafetensorsEntry* find_gpt2(const SafetensorsReader& r, const std::string& name, std::string* found) {
  const std::string bare = name.rfind("transformer.", 0) == 0 ? name.substr(12) : name;
  for (const std::string& n : {name, bare})
    if (const SafetensorsEntry* e = r.find(n)) {
      *found = n;
      return e;
    }
  return nullptr;
}

// Compares a checkpoint's size with the config's: "n_embd is 768 in X, model.n_embd is 512 in the config".
void agree(const std::string& where, const char* field, int got, const char* key, int want) {
  if (got != want)
    throw_user_error("{}: {} is {} in the checkpoint, {} is {} in the config; set {}={} to load it", where, field,
                     got, key, want, key, got);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// safetensors

std::vector<SafetensorsEntry> parse_safetensors_header(const std::string& text, uint64_t buffer_bytes,
                                                       const std::string& path) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_user_error("{}: the safetensors header is not valid JSON", path);
  if (!j.is_object()) throw_user_error("{}: the safetensors header is {}, expected a JSON object", path, j.type_name());
  std::vector<SafetensorsEntry> out;
  for (const auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) throw_user_error("{}: \"__metadata__\" is {}, expected an object", path, v.type_name());
      continue;
    }
    if (!v.is_object()) throw_user_error("{}: tensor \"{}\": entry is {}, expected an object", path, name, v.type_name());
    SafetensorsEntry e;
    e.name = name;
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string())
      throw_user_error("{}: tensor \"{}\": \"dtype\" missing or not a string", path, name);
    e.dtype = dt->get<std::string>();
    const size_t esize = dtype_bytes(e.dtype);
    if (esize == 0) throw_user_error("{}: tensor \"{}\": unknown dtype \"{}\"", path, name, e.dtype);
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array())
      throw_user_error("{}: tensor \"{}\": \"shape\" missing or not an array", path, name);
    uint64_t numel = 1;
    for (const json& d : *sh) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t(1) << 40))
        throw_user_error("{}: tensor \"{}\": shape {} is not a list of non-negative integers", path, name, sh->dump());
      const uint64_t dim = d.get<uint64_t>();
      e.shape.push_back(int64_t(dim));
      if (dim != 0 && numel > (uint64_t(1) << 50) / dim)  // checked before multiplying: no wrap-around
        throw_user_error("{}: tensor \"{}\": shape {} is absurdly large", path, name, sh->dump());
      numel *= dim;
    }
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      throw_user_error("{}: tensor \"{}\": \"data_offsets\" must be [begin, end], non-negative integers", path, name);
    e.begin = (*off)[0].get<uint64_t>();
    e.end = (*off)[1].get<uint64_t>();
    if (e.end < e.begin || e.end > buffer_bytes)
      throw_user_error("{}: tensor \"{}\": data_offsets [{}, {}] are outside the {}-byte data buffer", path, name,
                       e.begin, e.end, buffer_bytes);
    if (e.end - e.begin != numel * esize)
      throw_user_error("{}: tensor \"{}\": data_offsets [{}, {}] hold {} bytes, shape {} of {} needs {}", path, name,
                       e.begin, e.end, e.end - e.begin, shape_str(e.shape), e.dtype, numel * esize);
    out.push_back(std::move(e));
  }
  // no two tensors may share bytes
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : out)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      throw_user_error("{}: tensors \"{}\" [{}, {}] and \"{}\" [{}, {}] overlap in the data buffer", path,
                       by_offset[i - 1]->name, by_offset[i - 1]->begin, by_offset[i - 1]->end, by_offset[i]->name,
                       by_offset[i]->begin, by_offset[i]->end);
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    if (errno == ENOENT) throw_user_error("{}: safetensors file not found (no such file)", path);
    throw_user_error("{}: cannot open safetensors file: {}", path, std::strerror(errno));
  }
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || S_ISDIR(st.st_mode))
      throw_user_error("{}: is a directory or cannot be inspected, expected a safetensors file", path);
    const uint64_t file_bytes = uint64_t(st.st_size);
    if (file_bytes < 8)
      throw_user_error("{}: truncated: {} bytes, a safetensors file starts with an 8-byte header length", path,
                       file_bytes);
    unsigned char raw[8];
    if (::pread(fd_, raw, 8, 0) != 8) throw_user_error("{}: read failed: {}", path, std::strerror(errno));
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | raw[i];  // little-endian
    if (n > kMaxHeaderBytes)
      throw_user_error("{}: header length {} is absurd (at most {} bytes): not a safetensors file?", path, n,
                       kMaxHeaderBytes);
    if (n > file_bytes - 8)
      throw_user_error("{}: truncated: the header length is {} bytes, only {} follow", path, n, file_bytes - 8);
    std::string text(size_t(n), '\0');
    for (size_t done = 0; done < n;) {
      const ssize_t got = ::pread(fd_, text.data() + done, size_t(n) - done, off_t(8 + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) throw_user_error("{}: read failed in the header", path);
      done += size_t(got);
    }
    data_start_ = 8 + n;
    entries_ = parse_safetensors_header(text, file_bytes - data_start_, path);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

const SafetensorsEntry* SafetensorsReader::find(const std::string& name) const {
  auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                             [](const SafetensorsEntry& e, const std::string& n) { return e.name < n; });
  return it != entries_.end() && it->name == name ? &*it : nullptr;
}

std::vector<float> SafetensorsReader::read_f32(const std::string& name, const std::vector<int64_t>& expected) const {
  const SafetensorsEntry* e = find(name);
  if (!e) throw_user_error("{}: tensor \"{}\" is missing", path_, name);
  if (e->shape != expected)
    throw_user_error("{}: tensor \"{}\" has shape {}, expected {}", path_, name, shape_str(e->shape), shape_str(expected));
  if (e->dtype != "F32" && e->dtype != "BF16" && e->dtype != "F16")
    throw_user_error("{}: tensor \"{}\" has dtype {}, expected F32, BF16 or F16", path_, name, e->dtype);
  const size_t bytes = size_t(e->end - e->begin), esize = dtype_bytes(e->dtype), n = bytes / esize;
  std::vector<unsigned char> raw(bytes);
  for (size_t done = 0; done < bytes;) {
    const ssize_t got = ::pread(fd_, raw.data() + done, bytes - done, off_t(data_start_ + e->begin + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw_user_error("{}: read failed in tensor \"{}\": {}", path_, name, std::strerror(errno));
    if (got == 0) throw_user_error("{}: truncated: the file ended inside tensor \"{}\"", path_, name);
    done += size_t(got);
  }
  std::vector<float> out(n);
  if (e->dtype == "F32") {
    std::memcpy(out.data(), raw.data(), bytes);
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      out[i] = e->dtype == "BF16" ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return out;
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json md = json::object();
    for (const auto& [k, v] : metadata) md[k] = v;
    header["__metadata__"] = md;
  }
  uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= uint64_t(d);
    ULYSSES_ASSERT(numel == t.values.size(), "tensor {}: shape {} for {} values", t.name, shape_str(t.shape),
                   t.values.size());
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * numel}}};
    offset += 4 * numel;
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  write_file_atomically(path, [&](int fd, const std::string& tmp) {
    write_all(fd, len, 8, tmp);
    write_all(fd, text.data(), text.size(), tmp);
    for (const NamedTensor& t : tensors) write_all(fd, t.values.data(), t.values.size() * 4, tmp);
  });
}

// ---------------------------------------------------------------------------------------------
// config.json

HfGpt2Config parse_hf_gpt2_config(const std::string& text, const std::string& path) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_user_error("{}: not valid JSON", path);
  if (!j.is_object()) throw_user_error("{}: is {}, expected a JSON object", path, j.type_name());
  auto field = [&](const char* key) { return j.find(key); };
  if (auto it = field("model_type"); it != j.end() && *it != "gpt2")
    throw_user_error("{}: model_type is {}, ulysses reads GPT-2 (\"gpt2\") only", path, it->dump());
  if (auto it = field("activation_function");
      it != j.end() && *it != "gelu_new" && *it != "gelu_pytorch_tanh")
    throw_user_error("{}: activation_function is {}, ulysses computes the tanh GELU only (\"gelu_new\" or "
                     "\"gelu_pytorch_tanh\")",
                     path, it->dump());
  if (auto it = field("layer_norm_epsilon");
      it != j.end() && (!it->is_number() || std::abs(it->get<double>() - 1e-5) > 1e-12))
    throw_user_error("{}: layer_norm_epsilon is {}, ulysses' LayerNorm uses 1e-5", path, it->dump());
  const HfGpt2Config c{positive_int(j, "n_layer", path), positive_int(j, "n_embd", path),
                       positive_int(j, "n_head", path), positive_int(j, "vocab_size", path),
                       positive_int(j, "n_positions", path)};
  if (auto it = field("n_inner"); it != j.end() && !it->is_null() && *it != 4 * int64_t(c.n_embd))
    throw_user_error("{}: n_inner is {}, ulysses' MLP is 4 n_embd = {} wide", path, it->dump(), 4 * int64_t(c.n_embd));
  if (auto it = field("tie_word_embeddings"); it != j.end() && *it != true)
    throw_user_error("{}: tie_word_embeddings is {}, ulysses ties the LM head to wte", path, it->dump());
  if (auto it = field("scale_attn_weights"); it != j.end() && *it != true)
    throw_user_error("{}: scale_attn_weights is {}, ulysses scales attention by 1/sqrt(head_dim)", path, it->dump());
  if (auto it = field("scale_attn_by_inverse_layer_idx"); it != j.end() && *it != false)
    throw_user_error("{}: scale_attn_by_inverse_layer_idx is {}, ulysses does not scale by layer", path, it->dump());
  if (auto it = field("add_cross_attention"); it != j.end() && *it != false)
    throw_user_error("{}: add_cross_attention is {}, ulysses has no cross-attention", path, it->dump());
  if (c.n_embd % c.n_head != 0)
    throw_user_error("{}: n_embd {} is not divisible by n_head {}", path, c.n_embd, c.n_head);
  return c;
}

std::string hf_gpt2_config_json(const ModelConfig& m) {
  json j = json::object();
  j["architectures"] = {"GPT2LMHeadModel"};
  j["model_type"] = "gpt2";
  j["vocab_size"] = m.vocab_size;
  j["n_positions"] = m.max_seq_len;
  j["n_embd"] = m.n_embd;
  j["n_layer"] = m.n_layer;
  j["n_head"] = m.n_head;
  j["n_inner"] = nullptr;
  j["activation_function"] = "gelu_new";
  j["layer_norm_epsilon"] = 1e-5;
  j["initializer_range"] = m.init_std;
  j["resid_pdrop"] = 0.0;  // ulysses trains without dropout
  j["embd_pdrop"] = 0.0;
  j["attn_pdrop"] = 0.0;
  j["scale_attn_weights"] = true;
  j["scale_attn_by_inverse_layer_idx"] = false;
  j["reorder_and_upcast_attn"] = false;
  j["tie_word_embeddings"] = true;
  j["torch_dtype"] = "float32";
  // GPT-2's <|endoftext|>, when the vocabulary has it (transformers warns about ids outside it)
  j["bos_token_id"] = m.vocab_size > 50256 ? json(50256) : json(nullptr);
  j["eos_token_id"] = m.vocab_size > 50256 ? json(50256) : json(nullptr);
  return j.dump(2) + "\n";
}

// ---------------------------------------------------------------------------------------------
// GPT-2 <-> llm.c order

bool is_hf_checkpoint(const std::string& p) {
  std::error_code ec;
  if (fs::is_directory(p, ec)) return true;
  const std::string ext = ".safetensors";
  return p.size() >= ext.size() && p.compare(p.size() - ext.size(), ext.size(), ext) == 0;
}

std::vector<NamedTensor> hf_gpt2_tensors(const ModelConfig& m, const float* params, size_t n_params) {
  const LlmcHeader h = llmc_header_for(m);
  ULYSSES_ASSERT(n_params == llmc_param_count(h), "{} parameters for {}", n_params, llmc_param_count(h));
  const auto layout = llmc_param_tensors(h);
  std::vector<NamedTensor> out;
  for (int k = 0; k < kLlmcNumTensors; ++k) {
    const HfName& n = kHfNames[k];
    const LlmcTensor& t = layout[size_t(k)];
    const std::vector<int64_t> shape = hf_shape(t, n, m.vocab_size);
    const int layers = n.per_layer ? m.n_layer : 1;
    const size_t per = t.numel / size_t(layers);  // one layer's slice, padding included (wte)
    for (int l = 0; l < layers; ++l) {
      const float* src = params + t.offset + size_t(l) * per;
      NamedTensor nt{hf_name(n, l), shape, {}};
      if (n.transposed) {  // ulysses [rows, cols] -> HF [cols, rows]
        const int64_t rows = shape[1], cols = shape[0];
        nt.values.resize(size_t(rows * cols));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) nt.values[size_t(c * rows + r)] = src[r * cols + c];
      } else {
        size_t numel = 1;
        for (int64_t d : shape) numel *= size_t(d);
        nt.values.assign(src, src + numel);  // wte: the first V rows
      }
      out.push_back(std::move(nt));
    }
  }
  return out;
}

namespace {

// The safetensors file and the config.json (empty when there is none beside a bare .safetensors)
// of a Hugging Face checkpoint given as a directory or a file.
std::pair<std::string, std::string> hf_checkpoint_files(const std::string& path) {
  std::error_code ec;
  std::string st_path = path, config_path;
  if (fs::is_directory(path, ec)) {
    st_path = (fs::path(path) / "model.safetensors").string();
    config_path = (fs::path(path) / "config.json").string();
    if (!fs::exists(config_path, ec))
      throw_user_error("{}: no config.json in this Hugging Face checkpoint directory", path);
    if (!fs::exists(st_path, ec)) {
      if (fs::exists(fs::path(path) / "model.safetensors.index.json", ec))
        throw_user_error("{}: sharded safetensors checkpoints (model.safetensors.index.json) are not supported; "
                         "save with a larger max_shard_size", path);
      throw_user_error("{}: no model.safetensors in this Hugging Face checkpoint directory", path);
    }
  } else {
    const fs::path beside = fs::path(path).parent_path() / "config.json";
    if (fs::exists(beside, ec)) config_path = beside.string();
  }
  return {st_path, config_path};
}

// The checkpoint's shape: config.json's, or inferred from the tensors; it must be the config's.
void check_hf_shape(const SafetensorsReader& r, const std::string& st_path, const std::string& config_path,
                    const ModelConfig& m) {

  std::string found;
  if (!config_path.empty()) {
    const HfGpt2Config c = parse_hf_gpt2_config(read_text_file(config_path, "config.json"), config_path);
    agree(config_path, "n_layer", c.n_layer, "model.n_layer", m.n_layer);
    agree(config_path, "n_embd", c.n_embd, "model.n_embd", m.n_embd);
    agree(config_path, "n_head", c.n_head, "model.n_head", m.n_head);
    agree(config_path, "vocab_size", c.vocab_size, "model.vocab_size", m.vocab_size);
    agree(config_path, "n_positions", c.n_positions, "model.max_seq_len", m.max_seq_len);
  } else {
    const SafetensorsEntry* wte = find_gpt2(r, "transformer.wte.weight", &found);
    const SafetensorsEntry* wpe = find_gpt2(r, "transformer.wpe.weight", &found);
    if (!wte || wte->shape.size() != 2)
      throw_user_error("{}: no 2-d tensor \"wte.weight\" to infer vocab_size and n_embd from", st_path);
    if (!wpe || wpe->shape.size() != 2)
      throw_user_error("{}: no 2-d tensor \"wpe.weight\" to infer n_positions from", st_path);
    int layers = 0;
    while (find_gpt2(r, fmt::format("transformer.h.{}.ln_1.weight", layers), &found)) ++layers;
    agree(st_path, "n_layer (counted from h.*.ln_1.weight)", layers, "model.n_layer", m.n_layer);
    agree(st_path, "n_embd (wte.weight's columns)", int(wte->shape[1]), "model.n_embd", m.n_embd);
    agree(st_path, "vocab_size (wte.weight's rows)", int(wte->shape[0]), "model.vocab_size", m.vocab_size);
    agree(st_path, "n_positions (wpe.weight's rows)", int(wpe->shape[0]), "model.max_seq_len", m.max_seq_len);
  }
}

}  // namespace

void read_hf_checkpoint(const std::string& path, const ModelConfig& m, float* params, size_t n_params) {
  const LlmcHeader h = llmc_header_for(m);
  ULYSSES_ASSERT(n_params == llmc_param_count(h), "{} parameters for {}", n_params, llmc_param_count(h));
  const auto [st_path, config_path] = hf_checkpoint_files(path);
  const SafetensorsReader r(st_path);
  check_hf_shape(r, st_path, config_path, m);
  std::string found;

  // Every tensor read, placed (transposed where Conv1D), and accounted for.
  std::vector<bool> used(r.entries().size(), false);
  auto mark = [&](const std::string& name) { used[size_t(r.find(name) - r.entries().data())] = true; };
  const auto layout = llmc_param_tensors(h);
  std::fill(params, params + n_params, 0.0f);  // wte's padding rows stay 0
  for (int k = 0; k < kLlmcNumTensors; ++k) {
    const HfName& n = kHfNames[k];
    const LlmcTensor& t = layout[size_t(k)];
    const std::vector<int64_t> shape = hf_shape(t, n, m.vocab_size);
    const int layers = n.per_layer ? m.n_layer : 1;
    const size_t per = t.numel / size_t(layers);
    for (int l = 0; l < layers; ++l) {
      const std::string name = hf_name(n, l);
      if (!find_gpt2(r, name, &found))
        throw_user_error("{}: tensor \"{}\" is missing (expected shape {})", st_path, name, shape_str(shape));
      const std::vector<float> v = r.read_f32(found, shape);
      mark(found);
      float* dst = params + t.offset + size_t(l) * per;
      if (n.transposed) {  // HF [cols, rows] -> ulysses [rows, cols]
        const int64_t cols = shape[0], rows = shape[1];
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t rr = 0; rr < rows; ++rr) dst[rr * cols + c] = v[size_t(c * rows + rr)];
      } else {
        std::copy(v.begin(), v.end(), dst);
      }
    }
  }
  // the tied head: when present it must be wte
  if (const SafetensorsEntry* e = r.find("lm_head.weight")) {
    const std::vector<float> head = r.read_f32(e->name, {m.vocab_size, m.n_embd});
    if (std::memcmp(head.data(), params + layout[0].offset, head.size() * 4) != 0)
      throw_user_error("{}: lm_head.weight differs from wte.weight: ulysses ties the LM head to the token embedding",
                       st_path);
    mark(e->name);
  }
  for (size_t i = 0; i < r.entries().size(); ++i) {
    const std::string& name = r.entries()[i].name;
    const bool mask_buffer = name.size() > 10 && (name.compare(name.size() - 10, 10, ".attn.bias") == 0 ||
                                                  (name.size() > 17 && name.compare(name.size() - 17, 17, ".attn.masked_bias") == 0));
    if (!used[i] && !mask_buffer)
      throw_user_error("{}: unexpected tensor \"{}\" (not part of a {}-layer GPT-2)", st_path, name, m.n_layer);
  }
}

void write_hf_checkpoint(const std::string& dir, const ModelConfig& m, const float* params, size_t n_params) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir, ec))
    throw_user_error("{}: cannot create the Hugging Face export directory: {}", dir, ec.message());
  write_safetensors((fs::path(dir) / "model.safetensors").string(), hf_gpt2_tensors(m, params, n_params),
                    {{"format", "pt"}});
  const std::string config = hf_gpt2_config_json(m);
  write_file_atomically((fs::path(dir) / "config.json").string(),
                        [&](int fd, const std::string& tmp) { write_all(fd, config.data(), config.size(), tmp); });
}

}  // namespace ulysses
