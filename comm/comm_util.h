// Internal helpers shared by the comm backends (not part of the public comm interface):
// the one checking macro for MPI calls outside a communicator, and the byte-volume convention
// every backend uses for its counters, so MPI and NCCL report identical numbers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <fmt/format.h>
#include <mpi.h>

namespace ulysses::comm_detail {

// "MPI_ERR_COMM: invalid communicator" style text for an MPI return code.
inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", code);
  return std::string(text, size_t(len));
}

// World rank for messages; -1 before MPI_Init or after MPI_Finalize.
inline int world_rank_or_minus_one() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

[[noreturn]] inline void throw_mpi_failure(const char* call, const char* file, int line, int code) {
  throw std::runtime_error(fmt::format("{}:{}: rank {}: {} failed: {}", file, line,
                                       world_rank_or_minus_one(), call, mpi_error_text(code)));
}

// Bytes that leave one rank, per collective. Conventions (the same for every backend):
//   all_to_all:      (p-1) blocks of count_per_peer elements (the own block stays local)
//   all_reduce:      ring algorithm, 2*(p-1)/p * bytes (reduce-scatter then all-gather phase),
//                    rounded down to whole bytes
//   reduce_scatter:  (p-1) blocks of recv_count elements (ring: one block per step)
//   all_gather:      (p-1) blocks of send_count elements
//   broadcast:       the buffer once, counted on the root only (a pipelined chain/ring sends
//                    each byte out of the root once); 0 on every other rank
// Every formula gives 0 for a group of one rank.
inline uint64_t all_to_all_bytes(int p, size_t count_per_peer, size_t elem) {
  return uint64_t(p - 1) * count_per_peer * elem;
}
inline uint64_t all_reduce_bytes(int p, size_t count, size_t elem) {
  return 2 * uint64_t(p - 1) * count * elem / uint64_t(p);
}
inline uint64_t reduce_scatter_bytes(int p, size_t block_count, size_t elem) {
  return uint64_t(p - 1) * block_count * elem;
}
inline uint64_t all_gather_bytes(int p, size_t block_count, size_t elem) {
  return uint64_t(p - 1) * block_count * elem;
}
inline uint64_t broadcast_bytes(int p, int rank, int root, size_t count, size_t elem) {
  return (p > 1 && rank == root) ? uint64_t(count) * elem : 0;
}

// The address `elems` elements of `elem` bytes past p (displacements are in elements).
inline const char* at(const void* p, size_t elems, size_t elem) {
  return static_cast<const char*>(p) + elems * elem;
}
inline char* at(void* p, size_t elems, size_t elem) { return static_cast<char*>(p) + elems * elem; }

}  // namespace ulysses::comm_detail

// Checks an MPI call made outside a communicator (bootstrap, group construction). Communicators
// use MPI_ERRORS_RETURN and turn codes into CommError themselves.
#define ULYSSES_MPI_CHECK(call)                                                          \
  do {                                                                                   \
    int ulysses_mpi_rc_ = (call);                                                        \
    if (ulysses_mpi_rc_ != MPI_SUCCESS)                                                  \
      ::ulysses::comm_detail::throw_mpi_failure(#call, __FILE__, __LINE__, ulysses_mpi_rc_); \
  } while (0)

#ifdef ULYSSES_CUDA
#include <cuda_runtime.h>
namespace ulysses::comm_detail {
[[noreturn]] inline void throw_cuda_failure(const char* call, const char* file, int line,
                                            cudaError_t code) {
  throw std::runtime_error(fmt::format("{}:{}: rank {}: {} failed: {} ({})", file, line,
                                       world_rank_or_minus_one(), call, cudaGetErrorString(code),
                                       cudaGetErrorName(code)));
}
}  // namespace ulysses::comm_detail

#define ULYSSES_COMM_CUDA_CHECK(call)                                                     \
  do {                                                                                    \
    cudaError_t ulysses_cuda_rc_ = (call);                                                \
    if (ulysses_cuda_rc_ != cudaSuccess)                                                  \
      ::ulysses::comm_detail::throw_cuda_failure(#call, __FILE__, __LINE__, ulysses_cuda_rc_); \
  } while (0)
#endif
