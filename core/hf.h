// Hugging Face GPT-2 checkpoints (transformers' GPT2LMHeadModel): safetensors + config.json,
// import and export.
//
// safetensors file: u64 little-endian N, then N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}
// then the byte buffer; offsets are relative to the buffer's start, end exclusive.
//
// GPT-2's tensors (L layers, C channels, V vocabulary, maxT positions), names as
// GPT2LMHeadModel.save_pretrained writes them ("transformer." prefix; GPT2Model writes none,
// both are read), and where they go in ulysses' llm.c-ordered parameters (core/llmc.h):
//   transformer.wte.weight              [V, C]     -> wte [Vp, C] (rows V..Vp-1 zero)
//   transformer.wpe.weight              [maxT, C]  -> wpe
//   transformer.h.{l}.ln_1.weight/bias  [C]        -> ln1w / ln1b [l]
//   transformer.h.{l}.attn.c_attn.weight [C, 3C]   -> qkvw [l] [3C, C]    (transposed)
//   transformer.h.{l}.attn.c_attn.bias  [3C]       -> qkvb [l]
//   transformer.h.{l}.attn.c_proj.weight [C, C]    -> attprojw [l]        (transposed)
//   transformer.h.{l}.attn.c_proj.bias  [C]        -> attprojb [l]
//   transformer.h.{l}.ln_2.weight/bias  [C]        -> ln2w / ln2b [l]
//   transformer.h.{l}.mlp.c_fc.weight   [C, 4C]    -> fcw [l] [4C, C]     (transposed)
//   transformer.h.{l}.mlp.c_fc.bias     [4C]       -> fcb [l]
//   transformer.h.{l}.mlp.c_proj.weight [4C, C]    -> fcprojw [l] [C, 4C] (transposed)
//   transformer.h.{l}.mlp.c_proj.bias   [C]        -> fcprojb [l]
//   transformer.ln_f.weight/bias        [C]        -> lnfw / lnfb
// HF's Conv1D keeps weights as [in, out], nn.Linear's transpose, hence the transposes. The LM
// head is tied to wte: lm_head.weight, when a file has it, must equal wte. The causal-mask
// buffers some files carry (h.{l}.attn.bias, h.{l}.attn.masked_bias) are skipped.
// Loading accepts F32, BF16 and F16 (widened to fp32); exports are F32.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace ulysses {

// One tensor of a safetensors header. begin / end: bytes relative to the buffer.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;            // "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// Parses and validates a safetensors header (the JSON text) for a buffer of `buffer_bytes`:
// every entry an object with a known dtype, non-negative dims, in-bounds data_offsets whose
// length is numel * dtype size, and no two entries overlapping. Entries sorted by name.
// UserError naming `path` and the tensor / field.
std::vector<SafetensorsEntry> parse_safetensors_header(const std::string& json, uint64_t buffer_bytes,
                                                       const std::string& path);

// A safetensors file opened for reading: header validated, tensors read on demand.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);  // UserError: missing, truncated, bad header
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;  // null when absent
  // The tensor's values as fp32 (F32, BF16 or F16 in the file). UserError naming the file and
  // tensor when the dtype is another or the shape differs from `expected_shape`.
  std::vector<float> read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;  // 8 + header length
  std::vector<SafetensorsEntry> entries_;
};

// A tensor to write: name, shape, row-major fp32 values.
struct NamedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// Writes an F32 safetensors file atomically (core/fileio.h); the header is padded with spaces to
// a multiple of 8 bytes. metadata: the "__metadata__" strings (may be empty).
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata = {});

// The fields of a GPT-2 config.json that ulysses reads.
struct HfGpt2Config {
  int n_layer = 0, n_embd = 0, n_head = 0, vocab_size = 0, n_positions = 0;
};

// Parses config.json text. Refuses (UserError naming `path` and the field) what ulysses cannot
// honour: model_type other than gpt2, activation other than the tanh GELU (gelu_new,
// gelu_pytorch_tanh), layer_norm_epsilon other than 1e-5, n_inner other than null or 4 n_embd,
// untied embeddings, scale_attn_weights false, scale_attn_by_inverse_layer_idx true, cross
// attention; and missing or non-positive sizes. Dropout fields are ignored (ulysses has none).
HfGpt2Config parse_hf_gpt2_config(const std::string& json, const std::string& path);

// config.json text describing `m` for GPT2LMHeadModel (dropout 0, gelu_new, eps 1e-5).
std::string hf_gpt2_config_json(const ModelConfig& m);

// True when `init_from` names a Hugging Face checkpoint: a directory, or a .safetensors file.
bool is_hf_checkpoint(const std::string& init_from);

// The GPT-2 tensors of llm.c-ordered fp32 parameters of `m` (padded vocabulary), in HF names,
// layout and order (the export; also used to dump gradients under HF names). The padding rows
// of wte are dropped; no lm_head.weight (tied).
std::vector<NamedTensor> hf_gpt2_tensors(const ModelConfig& m, const float* params, size_t n_params);

// Reads a Hugging Face GPT-2 checkpoint into llm.c-ordered fp32 parameters of `m`:
//   path a directory: path/config.json + path/model.safetensors
//   path a .safetensors file: config.json beside it when there is one, else the shapes are
//   inferred from the tensors (n_head then comes from the config)
// The checkpoint's model must be the config's: UserError naming both ("n_embd is 768 in
// x/config.json, model.n_embd is 512 in the config"), or the file, tensor and expectation.
void read_hf_checkpoint(const std::string& path, const ModelConfig& m, float* params, size_t n_params);

// Writes dir/config.json and dir/model.safetensors (F32), creating dir; each file atomically.
void write_hf_checkpoint(const std::string& dir, const ModelConfig& m, const float* params, size_t n_params);

}  // namespace ulysses
