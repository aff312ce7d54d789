// Checking of every CUDA runtime, cuBLAS(Lt) and cuDNN call and of every kernel launch.
// A failure throws std::runtime_error naming the rank, the file and line, the failing call and
// the library's own error string, e.g.
//   "rank 3: kernels/cuda/layernorm.cu:88: cudaMemsetAsync(...) failed: out of memory"
// The rank is the one value of state here: a thread_local set once by the trainer after MPI is
// up (set_cuda_check_rank); it is -1 ("rank ?") until then, e.g. in single-process tests.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ulysses::cuda {

inline int& cuda_check_rank() {
  static thread_local int rank = -1;
  return rank;
}
inline void set_cuda_check_rank(int rank) { cuda_check_rank() = rank; }

[[noreturn]] inline void cuda_check_fail(const char* file, int line, const char* call, const char* what) {
  const int rank = cuda_check_rank();
  std::string msg = rank >= 0 ? "rank " + std::to_string(rank) : std::string("rank ?");
  msg += std::string(": ") + file + ":" + std::to_string(line) + ": " + call + " failed: " + what;
  throw std::runtime_error(msg);
}

inline const char* cuda_status_string(cudaError_t e) { return cudaGetErrorString(e); }
inline const char* cuda_status_string(cublasStatus_t s) { return cublasGetStatusString(s); }
inline bool cuda_status_ok(cudaError_t e) { return e == cudaSuccess; }
inline bool cuda_status_ok(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }

}  // namespace ulysses::cuda

// CUDA_CHECK(call): call returns cudaError_t or cublasStatus_t (cuBLAS and cuBLASLt alike).
// cuDNN statuses go through CUDNN_CHECK in the files that include cudnn.h.
#define CUDA_CHECK(call)                                                                \
  do {                                                                                  \
    const auto ulysses_status_ = (call);                                                \
    if (!::ulysses::cuda::cuda_status_ok(ulysses_status_))                              \
      ::ulysses::cuda::cuda_check_fail(__FILE__, __LINE__, #call,                       \
                                       ::ulysses::cuda::cuda_status_string(ulysses_status_)); \
  } while (0)

// CUDNN_CHECK(call): for cudnnStatus_t; usable once <cudnn.h> is included.
#define CUDNN_CHECK(call)                                                                      \
  do {                                                                                         \
    const cudnnStatus_t ulysses_status_ = (call);                                              \
    if (ulysses_status_ != CUDNN_STATUS_SUCCESS)                                               \
      ::ulysses::cuda::cuda_check_fail(__FILE__, __LINE__, #call, cudnnGetErrorString(ulysses_status_)); \
  } while (0)

// CUDA_CHECK_LAUNCH(name): right after a kernel launch; reports a bad launch configuration
// (too much shared memory, an invalid grid) under the kernel's name. Asynchronous faults inside
// the kernel surface at the next checked synchronising call.
#define CUDA_CHECK_LAUNCH(name)                                                              \
  do {                                                                                       \
    const cudaError_t ulysses_status_ = cudaGetLastError();                                  \
    if (ulysses_status_ != cudaSuccess)                                                      \
      ::ulysses::cuda::cuda_check_fail(__FILE__, __LINE__, "launch of " name,                \
                                       cudaGetErrorString(ulysses_status_));                 \
  } while (0)
