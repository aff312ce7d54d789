// Graceful stop on SIGTERM / SIGUSR1 / SIGINT (see core/signals.h).
#include "core/signals.h"

#include <signal.h>
#include <unistd.h>

#include <cstdint>

#include "core/base/error.h"

namespace ulysses {

namespace {

// The signal handler's only state: written by the handler, read by StopSignals::pending().
volatile sig_atomic_t g_stop_signal = 0;
volatile sig_atomic_t g_installed = 0;

constexpr int kStopSignals[] = {SIGTERM, SIGUSR1, SIGINT};
struct sigaction g_previous[3];

void write_stderr(const char* text) {
  size_t n = 0;
  while (text[n]) ++n;
  ssize_t rc = ::write(STDERR_FILENO, text, n);
  (void)rc;
}

// Async-signal-safe: sig_atomic_t stores, write(2) and _exit(2) only.
void on_stop_signal(int signo) {
  if (signo == SIGINT && g_stop_signal != 0) {
    write_stderr("\nulysses: second interrupt: exiting now without a checkpoint\n");
    ::_exit(130);  // 128 + SIGINT, what shells report for Ctrl-C
  }
  if (g_stop_signal == 0) {
    g_stop_signal = signo;
    write_stderr(signo == SIGINT
                     ? "\nulysses: interrupt: stopping after this step (Ctrl-C again exits at once)\n"
                     : "\nulysses: stop signal received: stopping after this step\n");
  }
}

}  // namespace

StopSignals::StopSignals() {
  ULYSSES_ASSERT(!g_installed, "only one StopSignals may be alive at a time");
  g_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int i = 0; i < 3; ++i) ::sigaction(kStopSignals[i], &sa, &g_previous[i]);
  g_installed = 1;
}

StopSignals::~StopSignals() {
  for (int i = 0; i < 3; ++i) ::sigaction(kStopSignals[i], &g_previous[i], nullptr);
  g_installed = 0;
  g_stop_signal = 0;
}

int StopSignals::pending() const { return int(g_stop_signal); }

int StopSignals::agree(Communicator& world) const {
  int32_t signo = int32_t(g_stop_signal);
  world.all_reduce(&signo, &signo, 1, DType::i32, ReduceOp::max);
  return int(signo);
}

const char* signal_name(int signo) {
  switch (signo) {
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    case SIGINT: return "SIGINT";
    default: return "a signal";
  }
}

}  // namespace ulysses
