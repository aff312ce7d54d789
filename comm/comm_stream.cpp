// CommStream (comm/comm_stream.h): the comm stream and its events.
#include "comm/comm_stream.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <stdexcept>
#include <thread>

#include "core/base/error.h"
#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#endif

namespace ulysses {

#ifdef ULYSSES_CUDA
namespace {
cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
cudaEvent_t as_event(void* e) { return static_cast<cudaEvent_t>(e); }
void* new_event() {
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}
}  // namespace

CommStream::CommStream(void* model_stream, int events, bool host_wait) : model_(model_stream), host_wait_(host_wait) {
  ULYSSES_ASSERT(events >= 0, "CommStream: {} events", events);
  try {
    int least = 0, greatest = 0;  // numerically: greatest priority = the lowest number
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
    comm_ = s;
    model_mark_ = new_event();
    comm_mark_ = new_event();
    for (int i = 0; i < events; ++i) events_.push_back(new_event());
  } catch (...) {
    release();
    throw;
  }
}

CommStream::~CommStream() { release(); }

void CommStream::release() {
  if (comm_) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(kDestroyWaitS);
    while (cudaStreamQuery(as_stream(comm_)) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() > deadline) {
        // a collective waits for a peer that will not come (an error elsewhere): leave the
        // stream and events to the process's end rather than hang here
        spdlog::error("comm stream: still busy after {} s at teardown; not waiting longer", kDestroyWaitS);
        comm_ = nullptr;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  for (void* e : events_) cudaEventDestroy(as_event(e));
  if (comm_mark_) cudaEventDestroy(as_event(comm_mark_));
  if (model_mark_) cudaEventDestroy(as_event(model_mark_));
  if (comm_) cudaStreamDestroy(as_stream(comm_));
  events_.clear();
  comm_ = model_mark_ = comm_mark_ = nullptr;
}

void CommStream::comm_follows_model() {
  CUDA_CHECK(cudaEventRecord(as_event(model_mark_), as_stream(model_)));
  CUDA_CHECK(cudaStreamWaitEvent(as_stream(comm_), as_event(model_mark_), 0));
}

void CommStream::record(int e) { CUDA_CHECK(cudaEventRecord(as_event(events_.at(size_t(e))), as_stream(comm_))); }

void CommStream::model_waits(int e) {
  CUDA_CHECK(cudaStreamWaitEvent(as_stream(model_), as_event(events_.at(size_t(e))), 0));
}

void CommStream::join() {
  CUDA_CHECK(cudaEventRecord(as_event(comm_mark_), as_stream(comm_)));
  CUDA_CHECK(cudaStreamWaitEvent(as_stream(model_), as_event(comm_mark_), 0));
}

void CommStream::wait_host() { CUDA_CHECK(cudaStreamSynchronize(as_stream(comm_))); }

#else

CommStream::CommStream(void*, int, bool) {
  throw std::runtime_error("a CUDA communication stream, but ulysses was built without CUDA");
}
CommStream::~CommStream() = default;
void CommStream::release() {}
void CommStream::comm_follows_model() {}
void CommStream::record(int) {}
void CommStream::model_waits(int) {}
void CommStream::join() {}
void CommStream::wait_host() {}

#endif

}  // namespace ulysses
