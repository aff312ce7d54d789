// spdlog setup for one rank (see core/log.h).
#include "core/base/log.h"

#include <spdlog/spdlog.h>

#include <utility>

#include "core/base/error.h"

namespace ulysses {

void init_logging(int world_rank, const std::string& level, bool all_ranks) {
  static const std::pair<const char*, spdlog::level::level_enum> kLevels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"error", spdlog::level::err}};
  spdlog::level::level_enum wanted = spdlog::level::off;
  bool found = false;
  for (const auto& [name, value] : kLevels) {
    if (level == name) { wanted = value; found = true; }
  }
  if (!found)
    throw_user_error("log level '{}' is not one of trace, debug, info, warn, error", level);

  // Ranks other than 0 stay quiet below warn: a 64-rank job prints each progress line once.
  if (world_rank != 0 && !all_ranks && wanted < spdlog::level::warn) wanted = spdlog::level::warn;

  // %v is the message; the rank is fixed text in this rank's pattern.
  spdlog::set_pattern(fmt::format("[%H:%M:%S.%e] [rank {}] [%l] %v", world_rank));
  spdlog::set_level(wanted);
  // Under mpirun stdout is a pipe; flush each line so ranks' output arrives in time order.
  spdlog::flush_on(spdlog::level::trace);
}

}  // namespace ulysses
