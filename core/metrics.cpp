#include "core/metrics.h"

#include <sys/resource.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "core/base/error.h"

namespace ulysses {

double peak_rss_gib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0 / double(1ull << 30);  // ru_maxrss is in KiB on Linux
}

MetricsWriter::MetricsWriter(const std::string& path, bool append) : path_(path) {
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) throw_user_error("logging.metrics_file '{}': cannot open for writing: {}", path, std::strerror(errno));
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

namespace {
// JSON has no NaN/Inf: write null for them. Finite values round-trip exactly.
std::string num(double v) { return std::isfinite(v) ? fmt::format("{}", v) : "null"; }  // shortest exact form
}  // namespace

void MetricsWriter::write(const StepMetrics& m) {
  if (!f_) return;
  std::string line = fmt::format(
      "{{\"step\": {}, \"loss\": {}, \"lr\": {}, \"grad_norm\": {}, \"step_ms\": {}, \"tokens\": {}, "
      "\"tokens_per_second\": {}, \"tflops_per_rank\": {}, \"peak_memory_gib\": {}, \"skipped\": {}",
      m.step, num(m.loss), num(m.lr), num(m.grad_norm), num(m.step_ms), m.tokens, num(m.tokens_per_second),
      num(m.tflops_per_rank), num(m.peak_memory_gib), m.skipped ? "true" : "false");
  if (m.val_loss >= 0) line += fmt::format(", \"val_loss\": {}", num(m.val_loss));
  line += ", \"comm_bytes_sent\": {";
  for (size_t c = 0; c < size_t(Collective::count); ++c)
    line += fmt::format("{}\"{}\": {}", c ? ", " : "", collective_name(Collective(c)), m.comm.bytes_sent[c]);
  line += "}}\n";
  // A full disk must not lose the metrics silently.
  if (std::fputs(line.c_str(), f_) == EOF || std::fflush(f_) != 0)
    throw_user_error("logging.metrics_file '{}': write failed: {}", path_, std::strerror(errno));
}

}  // namespace ulysses
