// A CUDA stream for collectives beside the model's stream, and the events that order the two:
// what runtime.overlap_comm (core/zero.h, core/zero3.h) and runtime.all_to_all_chunks
// (comm/ulysses.h) run their collectives on. Created once; a step only records and waits (no
// allocation; no host wait, except with host_wait: see run()). The comm stream has the device's
// highest priority, so a collective's kernel is scheduled as soon as it may run, not behind
// the blocks of a GEMM that fills the GPU.
//
//   model stream  ──k1──k2──●──────k3──k4──────◆──k5──      ● comm_follows_model()
//                           │                  ▲            ◆ model_waits(e) / join()
//   comm stream             └──collective──e───┘
//
// Cross-stream rules the users rely on: a buffer a collective reads must not be rewritten on the
// model stream before the model stream has waited for that collective's event, and a buffer it
// writes must not be read before then either; each user states why its buffers obey this.
#pragma once
#include <cstddef>
#include <vector>

#include "comm/communicator.h"

namespace ulysses {

class CommStream {
 public:
  // model_stream: the model context's cudaStream_t (not owned). events: how many numbered events
  // the user records and waits on. host_wait: the communicator is staged (MPI through pinned host
  // memory): after each run() the host waits for the comm stream (see run()). Throws on a build
  // without CUDA.
  CommStream(void* model_stream, int events, bool host_wait);
  // waits for the comm stream (collectives in flight read or write the users' buffers; at most
  // kDestroyWaitS seconds, so that an error that left a collective waiting for a dead peer ends
  // the process instead of hanging it), then destroys the stream and the events; nothing is
  // checked (destructors must not throw)
  ~CommStream();
  CommStream(const CommStream&) = delete;
  CommStream& operator=(const CommStream&) = delete;

  static constexpr double kDestroyWaitS = 60;
  void* stream() const { return comm_; }        // the comm stream (a cudaStream_t)
  void* model_stream() const { return model_; }

  // the comm stream starts only after what the model stream has enqueued so far
  void comm_follows_model();
  // event e marks everything enqueued on the comm stream so far
  void record(int e);
  // the model stream waits for event e (a no-op when e was never recorded, or has passed)
  void model_waits(int e);
  // the model stream waits for everything enqueued on the comm stream so far
  void join();

  // comm_follows_model(), then `collective` with c's stream set to the comm stream (set back to
  // the model stream afterwards, also when it throws), then record(done) (done < 0: none).
  // A staged communicator leaves its result's host-to-device copy on the comm stream reading its
  // pinned buffer, which its next collective (on either stream) refills, so with host_wait the
  // host waits for the comm stream here: one short copy, since the collective blocked the host
  // already.
  template <class F>
  void run(Communicator& c, int done, F&& collective) {
    comm_follows_model();
    c.set_stream(comm_);
    try {
      collective();
    } catch (...) {
      c.set_stream(model_);
      throw;
    }
    c.set_stream(model_);
    if (done >= 0) record(done);
    if (host_wait_) wait_host();
  }

 private:
  void wait_host();
  void release();
  void* model_ = nullptr;                // cudaStream_t, not owned
  void* comm_ = nullptr;                 // cudaStream_t, owned
  void* model_mark_ = nullptr;           // cudaEvent_t: model -> comm
  void* comm_mark_ = nullptr;            // cudaEvent_t: comm -> model (join)
  std::vector<void*> events_;            // cudaEvent_t, the numbered ones
  bool host_wait_ = false;
};

}  // namespace ulysses
