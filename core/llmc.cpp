// llm.c GPT-2 checkpoints (core/llmc.h): header validation, reading fp32/bf16 parameters into
// one fp32 buffer, and atomic writes.
#include "core/llmc.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/base/error.h"
#include "core/fileio.h"

namespace ulysses {

namespace {

constexpr size_t kHeaderInts = 256;
constexpr size_t kHeaderBytes = kHeaderInts * sizeof(int32_t);
constexpr size_t kChunkElements = size_t(1) << 20;  // conversion buffer for bf16

size_t element_bytes(int version) { return version == kLlmcVersionBf16 ? 2 : 4; }

float bf16_to_float(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu)) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// An open file descriptor that closes itself.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Opens `path` for reading, with errors for a missing file, a directory, an unreadable file.
int open_for_reading(const std::string& path, size_t* file_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw_user_error("{}: llm.c checkpoint not found (no such file)", path);
    throw_user_error("{}: cannot open llm.c checkpoint: {}", path, std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw_user_error("{}: is a directory or cannot be inspected, expected an llm.c checkpoint file",
                     path);
  }
  *file_bytes = size_t(st.st_size);
  return fd;
}

void read_exact(int fd, void* dst, size_t bytes, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (bytes > 0) {
    ssize_t n = ::read(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_user_error("{}: read failed: {}", path, std::strerror(errno));
    if (n == 0) throw_user_error("{}: truncated: the file ended early", path);
    p += n;
    bytes -= size_t(n);
  }
}

// Parses and checks a header already read from `path` (file_bytes: its size).
LlmcHeader parse_header(const int32_t* h, size_t file_bytes, const std::string& path) {
  if (h[0] != kLlmcMagic)
    throw_user_error("{}: not an llm.c GPT-2 checkpoint: magic is {}, expected {}", path, h[0],
                     kLlmcMagic);
  if (h[1] != kLlmcVersionFp32 && h[1] != kLlmcVersionBf16)
    throw_user_error("{}: llm.c checkpoint version {} is not supported, expected 3 (fp32) or 5 "
                     "(bf16)",
                     path, h[1]);
  LlmcHeader out;
  out.version = h[1];
  out.max_seq_len = h[2];
  out.vocab_size = h[3];
  out.num_layers = h[4];
  out.num_heads = h[5];
  out.channels = h[6];
  out.padded_vocab_size = h[7];
  const std::pair<const char*, int> fields[] = {
      {"max_seq_len", out.max_seq_len}, {"vocab_size", out.vocab_size},
      {"num_layers", out.num_layers},   {"num_heads", out.num_heads},
      {"channels", out.channels},       {"padded_vocab_size", out.padded_vocab_size}};
  for (const auto& [name, v] : fields)
    if (v <= 0) throw_user_error("{}: header field {} is {}, expected > 0", path, name, v);
  if (out.padded_vocab_size < out.vocab_size)
    throw_user_error("{}: padded_vocab_size {} is smaller than vocab_size {}", path,
                     out.padded_vocab_size, out.vocab_size);
  if (out.channels % out.num_heads != 0)
    throw_user_error("{}: channels {} is not divisible by num_heads {}", path, out.channels,
                     out.num_heads);
  const size_t expected = kHeaderBytes + llmc_param_count(out) * element_bytes(out.version);
  if (file_bytes < expected)
    throw_user_error("{}: truncated: the header describes {} parameters ({} bytes with the "
                     "header), the file has {} bytes",
                     path, llmc_param_count(out), expected, file_bytes);
  if (file_bytes > expected)
    throw_user_error("{}: {} bytes longer than the header describes ({} parameters, {} bytes)",
                     path, file_bytes - expected, llmc_param_count(out), expected);
  return out;
}

}  // namespace

std::array<LlmcTensor, kLlmcNumTensors> llmc_param_tensors(const LlmcHeader& h) {
  const int64_t L = h.num_layers, C = h.channels, Vp = h.padded_vocab_size, T = h.max_seq_len;
  std::array<LlmcTensor, kLlmcNumTensors> t = {{
      {"wte", {Vp, C}, 0, 0},
      {"wpe", {T, C}, 0, 0},
      {"ln1w", {L, C}, 0, 0},
      {"ln1b", {L, C}, 0, 0},
      {"qkvw", {L, 3 * C, C}, 0, 0},
      {"qkvb", {L, 3 * C}, 0, 0},
      {"attprojw", {L, C, C}, 0, 0},
      {"attprojb", {L, C}, 0, 0},
      {"ln2w", {L, C}, 0, 0},
      {"ln2b", {L, C}, 0, 0},
      {"fcw", {L, 4 * C, C}, 0, 0},
      {"fcb", {L, 4 * C}, 0, 0},
      {"fcprojw", {L, C, 4 * C}, 0, 0},
      {"fcprojb", {L, C}, 0, 0},
      {"lnfw", {C}, 0, 0},
      {"lnfb", {C}, 0, 0},
  }};
  size_t offset = 0;
  for (LlmcTensor& x : t) {
    x.numel = 1;
    for (int64_t d : x.shape) x.numel *= size_t(d);
    x.offset = offset;
    offset += x.numel;
  }
  return t;
}

size_t llmc_param_count(const LlmcHeader& h) {
  const auto t = llmc_param_tensors(h);
  return t.back().offset + t.back().numel;
}

LlmcHeader llmc_header_for(const ModelConfig& m) {
  if (m.kv_heads() != m.n_head)
    throw_user_error("the llm.c GPT-2 format has no grouped-query attention: model.n_kv_head is "
                     "{}, model.n_head is {}",
                     m.kv_heads(), m.n_head);
  if (m.rope())
    throw_user_error("the llm.c GPT-2 format has learned positions only: "
                     "model.position_embedding is '{}'",
                     m.position_embedding);
  LlmcHeader h;
  h.version = kLlmcVersionFp32;
  h.max_seq_len = m.max_seq_len;
  h.vocab_size = m.vocab_size;
  h.num_layers = m.n_layer;
  h.num_heads = m.n_head;
  h.channels = m.n_embd;
  h.padded_vocab_size = m.padded_vocab_size();
  return h;
}

LlmcHeader read_llmc_header(const std::string& path) {
  size_t file_bytes = 0;
  Fd f{open_for_reading(path, &file_bytes)};
  if (file_bytes < kHeaderBytes)
    throw_user_error("{}: too short for an llm.c checkpoint header: {} bytes, expected at least {}",
                     path, file_bytes, kHeaderBytes);
  int32_t h[kHeaderInts];
  read_exact(f.fd, h, kHeaderBytes, path);
  return parse_header(h, file_bytes, path);
}

void read_llmc_checkpoint(const std::string& path, const LlmcHeader& expected, float* params,
                          size_t n_params) {
  ULYSSES_ASSERT(n_params == llmc_param_count(expected), "buffer of {} floats for {} parameters",
                 n_params, llmc_param_count(expected));
  size_t file_bytes = 0;
  Fd f{open_for_reading(path, &file_bytes)};
  if (file_bytes < kHeaderBytes)
    throw_user_error("{}: too short for an llm.c checkpoint header: {} bytes, expected at least {}",
                     path, file_bytes, kHeaderBytes);
  int32_t raw[kHeaderInts];
  read_exact(f.fd, raw, kHeaderBytes, path);
  // Compare the model before the size, so a mismatch is reported as such, not as truncation.
  const std::pair<const char*, std::pair<int, int>> fields[] = {
      {"max_seq_len", {raw[2], expected.max_seq_len}},
      {"vocab_size", {raw[3], expected.vocab_size}},
      {"num_layers", {raw[4], expected.num_layers}},
      {"num_heads", {raw[5], expected.num_heads}},
      {"channels", {raw[6], expected.channels}},
      {"padded_vocab_size", {raw[7], expected.padded_vocab_size}}};
  if (raw[0] == kLlmcMagic)
    for (const auto& [name, v] : fields)
      if (v.first != v.second)
        throw_user_error("{}: {} is {} in the file, the config says {}", path, name, v.first,
                         v.second);
  const LlmcHeader h = parse_header(raw, file_bytes, path);

  if (h.version == kLlmcVersionFp32) {
    read_exact(f.fd, params, n_params * sizeof(float), path);
    return;
  }
  std::vector<uint16_t> buf(std::min(n_params, kChunkElements));
  for (size_t done = 0; done < n_params;) {
    const size_t n = std::min(buf.size(), n_params - done);
    read_exact(f.fd, buf.data(), n * sizeof(uint16_t), path);
    for (size_t i = 0; i < n; i++) params[done + i] = bf16_to_float(buf[i]);
    done += n;
  }
}

void write_llmc_checkpoint(const std::string& path, const LlmcHeader& h, const float* params,
                           size_t n_params) {
  ULYSSES_ASSERT(h.version == kLlmcVersionFp32 || h.version == kLlmcVersionBf16,
                 "llm.c version {}", h.version);
  ULYSSES_ASSERT(n_params == llmc_param_count(h), "buffer of {} floats for {} parameters",
                 n_params, llmc_param_count(h));
  int32_t raw[kHeaderInts] = {};
  raw[0] = kLlmcMagic;
  raw[1] = h.version;
  raw[2] = h.max_seq_len;
  raw[3] = h.vocab_size;
  raw[4] = h.num_layers;
  raw[5] = h.num_heads;
  raw[6] = h.channels;
  raw[7] = h.padded_vocab_size;

  write_file_atomically(path, [&](int fd, const std::string& tmp) {
    write_all(fd, raw, kHeaderBytes, tmp);
    if (h.version == kLlmcVersionFp32) {
      write_all(fd, params, n_params * sizeof(float), tmp);
    } else {
      std::vector<uint16_t> buf(std::min(n_params, kChunkElements));
      for (size_t done = 0; done < n_params;) {
        const size_t n = std::min(buf.size(), n_params - done);
        for (size_t i = 0; i < n; i++) buf[i] = float_to_bf16(params[done + i]);
        write_all(fd, buf.data(), n * sizeof(uint16_t), tmp);
        done += n;
      }
    }
  });
}

}  // namespace ulysses
