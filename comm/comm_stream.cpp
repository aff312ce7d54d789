// CommStream (comm/comm_stream.h): the comm stream and its events.
#include "comm/comm_stream.h"

#include <stdexcept>

#include "core/error.h"
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
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
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
  if (comm_) cudaStreamSynchronize(as_stream(comm_));
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
