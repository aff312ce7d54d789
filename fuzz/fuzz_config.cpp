// libFuzzer target: the config loader (core/config.cpp) on arbitrary bytes.
// Input: if the first line holds '=', it is one --set override; the rest is the YAML text.
// Properties checked: any input either loads or throws UserError (anything else is a bug and
// ends the run); a config that loads prints (to_yaml) to YAML that loads back to the same text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/base/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  const size_t nl = text.find('\n');
  if (nl != std::string::npos && text.substr(0, nl).find('=') != std::string::npos) {
    overrides.push_back(text.substr(0, nl));
    text = text.substr(nl + 1);
  }
  ulysses::Config cfg;
  try {
    cfg = ulysses::load_config_string(text, "fuzz.yaml", overrides);
    ulysses::validate_for_world(cfg, 4);
  } catch (const ulysses::UserError&) {
    return 0;
  }
  const std::string printed = ulysses::to_yaml(cfg);
  const ulysses::Config again = ulysses::load_config_string(printed, "fuzz.yaml");  // must not throw (same source: to_yaml names it)
  if (ulysses::to_yaml(again) != printed) std::abort();  // the round trip lost something
  return 0;
}
