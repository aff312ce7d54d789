// MPI bootstrap (comm/bootstrap.h): MPI_Init_thread(FUNNELED) unless MPI is already up, world
// and node-local rank/size (MPI_Comm_split_type SHARED), the host name, job-wide abort, and the
// CUDA device choice by local rank. Every MPI and CUDA call goes through one checking macro.
#include "comm/bootstrap.h"

#include <cstdlib>

#include <mpi.h>

#include "comm/comm_util.h"
#include "core/base/error.h"
#ifdef ULYSSES_CUDA
#include "kernels/cuda/cuda_check.h"
#endif

namespace ulysses {

namespace {

// Rank, size, node-local rank and size, host name of `mpi` within mpi.comm.
void read_layout(MpiRuntime& mpi) {
  ULYSSES_MPI_CHECK(MPI_Comm_rank(mpi.comm, &mpi.world_rank));
  ULYSSES_MPI_CHECK(MPI_Comm_size(mpi.comm, &mpi.world_size));

  // The ranks that share memory with this one are the ranks on this node.
  MPI_Comm node = MPI_COMM_NULL;
  ULYSSES_MPI_CHECK(
      MPI_Comm_split_type(mpi.comm, MPI_COMM_TYPE_SHARED, mpi.world_rank, MPI_INFO_NULL, &node));
  ULYSSES_MPI_CHECK(MPI_Comm_rank(node, &mpi.local_rank));
  ULYSSES_MPI_CHECK(MPI_Comm_size(node, &mpi.local_size));
  ULYSSES_MPI_CHECK(MPI_Comm_free(&node));

  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  ULYSSES_MPI_CHECK(MPI_Get_processor_name(name, &len));
  mpi.hostname.assign(name, size_t(len));
}

}  // namespace

MpiRuntime::MpiRuntime(MPI_Comm c) : comm(c) {
  int initialized = 0;
  ULYSSES_MPI_CHECK(MPI_Initialized(&initialized));
  if (!initialized) throw std::runtime_error("MpiRuntime(MPI_Comm): MPI is not initialised");
  read_layout(*this);
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  ULYSSES_MPI_CHECK(MPI_Initialized(&initialized));
  if (!initialized) {
    int provided = 0;
    ULYSSES_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    owns_mpi = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      throw std::runtime_error(fmt::format(
          "MPI provides thread level {} but ulysses needs MPI_THREAD_FUNNELED ({})", provided,
          int(MPI_THREAD_FUNNELED)));
    }
  }
  read_layout(*this);
}

MpiRuntime::~MpiRuntime() {
  if (!owns_mpi) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();  // a destructor cannot throw; a failing finalize is moot
}

void MpiRuntime::abort(int code) const {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

#ifdef ULYSSES_CUDA

int cuda_device_count() {
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: clear the sticky error, report none
    return 0;
  }
  return count;
}

std::string cuda_pci_bus_id(int device) {
  char id[64] = {};
  if (cudaDeviceGetPCIBusId(id, int(sizeof(id)), device) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  return id;
}

int select_cuda_device(const MpiRuntime& mpi, bool allow_sharing) {
  int count = cuda_device_count();
  if (count == 0)
    throw_user_error("rank {} on host '{}': no CUDA device is visible (check CUDA_VISIBLE_DEVICES "
                     "and the driver), or run with runtime.device=cpu",
                     mpi.world_rank, mpi.hostname);
  if (mpi.local_size > count && !allow_sharing)
    throw_user_error("host '{}' runs {} ranks but has {} visible CUDA device(s); the NCCL backend "
                     "needs one GPU per rank: start at most {} ranks per node (or use "
                     "parallel.backend=mpi, which lets ranks share a GPU)",
                     mpi.hostname, mpi.local_size, count, count);
  int device = mpi.local_rank % count;
  ULYSSES_COMM_CUDA_CHECK(cudaSetDevice(device));
  cuda::set_cuda_check_rank(mpi.world_rank);
  return device;
}

#else

int cuda_device_count() { return 0; }

std::string cuda_pci_bus_id(int /*device*/) { return ""; }

int select_cuda_device(const MpiRuntime& mpi, bool /*allow_sharing*/) {
  throw_user_error("rank {} on host '{}': ulysses was built without CUDA (ULYSSES_CUDA=OFF); "
                   "use runtime.device=cpu or rebuild with CUDA",
                   mpi.world_rank, mpi.hostname);
}

#endif

}  // namespace ulysses
