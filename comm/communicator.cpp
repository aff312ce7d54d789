#include "comm/communicator.h"

namespace ulysses {

const char* comm_backend_name(CommBackend b) { return b == CommBackend::mpi ? "mpi" : "nccl"; }

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::all_to_all: return "all_to_all";
    case Collective::all_reduce: return "all_reduce";
    case Collective::reduce_scatter: return "reduce_scatter";
    case Collective::all_gather: return "all_gather";
    case Collective::broadcast: return "broadcast";
    case Collective::count: break;
  }
  return "?";
}

void CommCounters::take(CommCounters& other) {
  for (size_t c = 0; c < bytes_sent.size(); ++c) {
    bytes_sent[c] += other.bytes_sent[c];
    calls[c] += other.calls[c];
  }
  other.reset();
}

uint64_t CommCounters::total_bytes_sent() const {
  uint64_t total = 0;
  for (uint64_t b : bytes_sent) total += b;
  return total;
}

}  // namespace ulysses
