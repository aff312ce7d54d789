// Step metrics: a JSON-lines file (one object per step, written by world rank 0) and the
// numbers the progress line shows.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

#include "comm/communicator.h"

namespace ulysses {

struct StepMetrics {
  int step = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  double step_ms = 0, tokens_per_second = 0, tflops_per_rank = 0;
  double peak_memory_gib = 0;
  int64_t tokens = 0;           // tokens in this optimizer step over all ranks
  bool skipped = false;         // non-finite loss or gradient norm: no update
  double val_loss = -1;         // < 0: no validation this step
  CommCounters comm;            // this rank's bytes sent during the step (world + sequence groups)
};

// Peak resident set of this process in GiB (getrusage).
double peak_rss_gib();

class MetricsWriter {
 public:
  MetricsWriter() = default;
  // Opens (truncates, or appends when `append`) the file; UserError naming it on failure.
  MetricsWriter(const std::string& path, bool append);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const StepMetrics& m);

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
};

}  // namespace ulysses
