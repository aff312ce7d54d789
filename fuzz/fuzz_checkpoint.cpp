// libFuzzer target: the checkpoint reader (core/checkpoint.cpp): verify_checkpoint and
// load_checkpoint on a directory whose files come from the input.
// Input: model.bin, optimizer.bin, state.yaml and manifest.yaml separated by the line
// "\n@@FILE@@\n" (missing parts: the file is absent). The model is fixed and tiny (below);
// fuzz.sh makes seed inputs from real checkpoints of that model. Properties: both calls either
// succeed or throw UserError (anything else, or a sanitizer report, is a finding).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/base/error.h"
#include "core/gpt.h"
#include "fuzz/seed_model.h"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ulysses::GPTShape shape = ulysses::GPTShape::from(ulysses::fuzz::seed_model());
  static const int64_t n = ulysses::num_parameters(shape);
  static std::vector<float> params = std::vector<float>(size_t(n)), m = params, v = params;
  static const fs::path dir = fs::temp_directory_path() / ("ulysses_fuzz_ckpt_" + std::to_string(::getpid()));

  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::string sep = "\n@@FILE@@\n";
  const char* names[] = {"model.bin", "optimizer.bin", "state.yaml", "manifest.yaml"};
  size_t at = 0;
  for (const char* name : names) {
    if (at > input.size()) break;
    size_t end = input.find(sep, at);
    if (end == std::string::npos) end = input.size();
    std::ofstream(dir / name, std::ios::binary).write(input.data() + at, std::streamsize(end - at));
    at = end + sep.size();
  }
  // Both run on every input: the reader must hold up even when the manifest check would have
  // stopped the trainer earlier.
  (void)ulysses::verify_checkpoint(dir.string());
  try {
    (void)ulysses::load_checkpoint(dir.string(), shape, params.data(), m.data(), v.data(), n);
  } catch (const ulysses::UserError&) {
  }
  return 0;
}
