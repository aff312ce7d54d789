// llm.c's GPT-2 checkpoint format (gpt2_124M.bin and friends): import and export.
//
// File: 256 int32 header, then the 16 parameter tensors back to back, fp32 (version 3) or bf16
// (version 5):
//   header[0] = 20240326 (magic)   [1] = version   [2] = max_seq_len   [3] = vocab_size
//   header[4] = num_layers         [5] = num_heads [6] = channels      [7] = padded_vocab_size
// Tensors, with L layers, C channels, Vp padded vocabulary, maxT positions:
//   wte[Vp,C] wpe[maxT,C] ln1w[L,C] ln1b[L,C] qkvw[L,3C,C] qkvb[L,3C] attprojw[L,C,C]
//   attprojb[L,C] ln2w[L,C] ln2b[L,C] fcw[L,4C,C] fcb[L,4C] fcprojw[L,C,4C] fcprojb[L,C]
//   lnfw[C] lnfb[C]
// In memory the parameters are one contiguous fp32 buffer in exactly this order (the model keeps
// its parameters so). Reading a bf16 file widens to fp32; writing with version 5 rounds to bf16
// (round to nearest even).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace ulysses {

constexpr int32_t kLlmcMagic = 20240326;
constexpr int32_t kLlmcVersionFp32 = 3;
constexpr int32_t kLlmcVersionBf16 = 5;
constexpr int kLlmcNumTensors = 16;

struct LlmcHeader {
  int version = kLlmcVersionFp32;  // 3 = fp32, 5 = bf16
  int max_seq_len = 0;             // maxT
  int vocab_size = 0;              // V
  int num_layers = 0;              // L
  int num_heads = 0;               // H
  int channels = 0;                // C
  int padded_vocab_size = 0;       // Vp >= V; rows V..Vp-1 of wte are padding
};

struct LlmcTensor {
  const char* name;             // "wte", "wpe", ..., "lnfb"
  std::vector<int64_t> shape;   // e.g. {L, 3C, C}
  size_t numel;
  size_t offset;                // in elements from the start of the parameter buffer
};

// The 16 tensors in file order, with shapes and offsets for this header.
std::array<LlmcTensor, kLlmcNumTensors> llmc_param_tensors(const LlmcHeader& h);
// Total number of parameters (sum of the 16 tensors' sizes), padding rows of wte included.
size_t llmc_param_count(const LlmcHeader& h);

// The header that describes `m` (fp32). Throws UserError when the model cannot be expressed in
// llm.c's GPT-2 layout (grouped-query attention, rotary positions).
LlmcHeader llmc_header_for(const ModelConfig& m);

// Reads and validates the header: magic, version (3 or 5), positive sizes, C divisible by H,
// Vp >= V, and a file size that matches header + parameters. Errors name the file.
LlmcHeader read_llmc_header(const std::string& path);

// Reads the parameters into `params` (n_params fp32 values, which must equal
// llmc_param_count(expected)). Throws UserError naming the file and the field when the file's
// model differs from `expected` ("channels is 768 in the file, the config says 512"); the
// version (fp32 or bf16) may differ from expected.version.
void read_llmc_checkpoint(const std::string& path, const LlmcHeader& expected, float* params,
                          size_t n_params);

// Writes header + parameters (fp32 for version 3, bf16 for version 5) atomically: a temporary
// file, fsync, rename.
void write_llmc_checkpoint(const std::string& path, const LlmcHeader& header, const float* params,
                           size_t n_params);

}  // namespace ulysses
