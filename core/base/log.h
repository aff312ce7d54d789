// Logging: sets up spdlog's default logger for this rank. Every line carries the time, the rank
// and the level, e.g. `[12:00:01.123] [rank 0] [info] step 10 ...`. Info, debug and trace lines
// come only from rank 0 (unless all_ranks), warnings and errors from every rank. Code logs with
// the plain spdlog calls (spdlog::info(...)) after init_logging().
#pragma once
#include <string>

namespace ulysses {

// `level`: trace | debug | info | warn | error; anything else throws UserError listing those.
void init_logging(int world_rank, const std::string& level, bool all_ranks);

}  // namespace ulysses
