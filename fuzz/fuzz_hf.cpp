// libFuzzer target: the Hugging Face checkpoint reader (core/hf.cpp): read_hf_checkpoint on a
// directory whose config.json and model.safetensors come from the input, and the two parsers
// (parse_hf_gpt2_config, parse_safetensors_header) on the raw parts.
// Input: config.json and model.safetensors separated by the line "\n@@FILE@@\n" (no separator:
// the whole input is model.safetensors, read without a config.json, shapes from the tensors).
// The model is fixed and tiny (below); ci-extra.sh makes seed inputs from `checkpoint.export_hf`
// of that model. Property: every call succeeds or throws UserError (anything else, or a
// sanitizer report, is a finding).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/base/error.h"
#include "core/hf.h"
#include "core/llmc.h"
#include "fuzz/seed_model.h"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ulysses::ModelConfig model = ulysses::fuzz::seed_model();
  static std::vector<float> params(ulysses::llmc_param_count(ulysses::llmc_header_for(model)));
  static const fs::path dir = fs::temp_directory_path() / ("ulysses_fuzz_hf_" + std::to_string(::getpid()));

  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::string sep = "\n@@FILE@@\n";
  const size_t cut = input.find(sep);
  const bool with_config = cut != std::string::npos;
  const std::string config = with_config ? input.substr(0, cut) : "";
  const std::string tensors = with_config ? input.substr(cut + sep.size()) : input;
  fs::remove_all(dir);
  fs::create_directories(dir);
  if (with_config) std::ofstream(dir / "config.json", std::ios::binary) << config;
  std::ofstream(dir / "model.safetensors", std::ios::binary) << tensors;

  try {
    ulysses::read_hf_checkpoint(with_config ? dir.string() : (dir / "model.safetensors").string(), model,
                                params.data(), params.size());
  } catch (const ulysses::UserError&) {
  }
  try {
    (void)ulysses::parse_hf_gpt2_config(config, "config.json");
  } catch (const ulysses::UserError&) {
  }
  if (tensors.size() > 8) {
    try {
      (void)ulysses::parse_safetensors_header(tensors.substr(8), uint64_t(tensors.size()), "model.safetensors");
    } catch (const ulysses::UserError&) {
    }
  }
  return 0;
}
