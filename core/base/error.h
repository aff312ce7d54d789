// Errors. A UserError is bad input (config, data file, checkpoint, command line): its message
// names the file, key or line and what was expected; the executable prints it without a stack
// trace and exits with code 2. Anything else that is thrown is a bug or a system failure.
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace ulysses {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A UserError that every rank raised together (for example a file that rank 0 read for all and
// whose error was broadcast): the executable prints it once, on rank 0, and every rank exits 2
// without aborting the job.
struct AllRanksUserError : UserError {
  using UserError::UserError;
};

// throw_user_error("{}: expected {} got {}", path, a, b)
template <typename... Args>
[[noreturn]] void throw_user_error(fmt::format_string<Args...> f, Args&&... args) {
  throw UserError(fmt::format(f, std::forward<Args>(args)...));
}

// Internal invariant; failing it is a bug in ulysses, reported with file and line.
#define ULYSSES_ASSERT(cond, ...)                                                              \
  do {                                                                                         \
    if (!(cond))                                                                               \
      throw std::logic_error(fmt::format("{}:{}: assertion `{}` failed: {}", __FILE__, __LINE__, \
                                         #cond, fmt::format(__VA_ARGS__)));                    \
  } while (0)

}  // namespace ulysses
