// Process groups for DP × SP, and the choice of device and communication backend they run on.
// Sequence-parallel groups are P consecutive world ranks (on a GPU node they share NVLink);
// data-parallel groups take the ranks with the same SP rank, strided by P.
// world rank = dp_rank * P + sp_rank.
#pragma once
#include <memory>
#include <string>

#include <mpi.h>

#include "comm/bootstrap.h"
#include "comm/communicator.h"

namespace ulysses {

#ifdef ULYSSES_CUDA
constexpr bool kCudaBuild = true;
#else
constexpr bool kCudaBuild = false;
#endif

// What the ranks can see, agreed over the job (every rank gets the same answer).
struct DeviceSurvey {
  int min_devices = 0;   // fewest CUDA devices visible to any rank (0 without CUDA or a GPU)
  bool shared = false;   // on some host two ranks would take the same GPU (same PCI bus id)
};
// Collective over mpi.comm: every rank counts its devices and names (PCI bus id) the one it
// would take, local_rank % count; the host's ranks compare names; then MPI_MIN / MPI_MAX.
DeviceSurvey survey_cuda_devices(const MpiRuntime& mpi);

// runtime.device (auto | cpu | cuda) -> the device. auto: cuda when the build has CUDA and every
// rank sees a device, else cpu. cuda without a CUDA build or with some rank seeing no device:
// UserError naming runtime.device. Pure (unit-tested without devices).
Device resolve_device(const std::string& requested, const DeviceSurvey& survey, bool cuda_build = kCudaBuild);

// parallel.backend (auto | mpi | nccl) -> the backend, for a resolved device. auto: nccl on cuda
// when every rank has a GPU of its own, mpi otherwise (on cuda: MPI staged through pinned host
// buffers, comm/staged_communicator.h; NCCL refuses two ranks on one GPU). nccl on cpu or with
// shared GPUs: UserError naming parallel.backend. Pure.
CommBackend resolve_comm_backend(const std::string& requested, Device device, const DeviceSurvey& survey);

// The device and backend of a run, with the CUDA device selected (local_rank % device count) and
// the CUDA error messages of this thread naming the rank (cuda::set_cuda_check_rank).
struct DevicePlan {
  Device device = Device::cpu;
  CommBackend backend = CommBackend::mpi;
  int cuda_device = -1;  // -1 on cpu
  DeviceSurvey survey;
};
// Collective over mpi.comm (survey_cuda_devices); every rank resolves identically.
DevicePlan setup_devices(const std::string& runtime_device, const std::string& parallel_backend,
                         const MpiRuntime& mpi);

struct ProcessGroups {
  int world_rank = 0, world_size = 1;
  int sp_size = 1, sp_rank = 0;    // position inside this rank's sequence-parallel group
  int dp_size = 1, dp_rank = 0;    // index of this rank's sequence-parallel group
  // On the backend's memory: host for MPI on cpu; device for NCCL and for MPI on cuda (staged).
  std::unique_ptr<Communicator> world;     // all ranks (gradient averaging over DP × SP)
  std::unique_ptr<Communicator> sequence;  // the P ranks sharing one sequence (all-to-alls)
  std::unique_ptr<Communicator> data;      // the DP ranks with the same sp_rank
  // All ranks again, over host memory, for the small host values of the trainer (loss sums, the
  // stop-signal vote, error messages, checkpoint staging); null when `world` is on host memory
  // already (host_world() is then world itself).
  std::unique_ptr<Communicator> host;
  Communicator& host_world() { return host ? *host : *world; }
  // The CUDA stream the device communicators enqueue on (the model's; MPI on cpu ignores it).
  // Call once, before the first collective.
  void set_stream(void* cuda_stream);
};

// Validates world_size % sequence_parallel_size == 0 (UserError otherwise) and builds the
// communicators. nccl: NCCL communicators (an ncclUniqueId broadcast over MPI per group; the CUDA
// device must be selected first). mpi: MPI communicators on host memory, or with device cuda
// wrapped in StagedCommunicator (device memory in, host memory through MPI).
ProcessGroups make_process_groups(int sequence_parallel_size, CommBackend backend, Device device = Device::cpu,
                                  MPI_Comm world = MPI_COMM_WORLD);

// NCCL communicators whose kernels may run at once on one GPU (the comm streams of
// runtime.overlap_comm and runtime.all_to_all_chunks beside the model stream) must launch them
// in one order on every GPU, or the GPUs can deadlock. Every rank issues its collectives from
// one thread in the same order, so NCCL (2.26 and later) can keep that order itself: with
// `concurrent`, this sets NCCL_LAUNCH_ORDER_IMPLICIT=1 for this process unless the environment
// sets it already. Call before make_process_groups (NCCL reads it when it initialises).
void order_nccl_launches(bool concurrent);

// One communicator over `comm` on the MPI backend (tests use it directly).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, std::string name);
#ifdef ULYSSES_CUDA
// One NCCL communicator over the ranks of `comm` (ncclUniqueId broadcast over `comm`).
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, std::string name);
// `host_comm` (host memory) made to take device buffers (comm/staged_communicator.h).
std::unique_ptr<Communicator> make_staged_communicator(std::unique_ptr<Communicator> host_comm);
#endif

}  // namespace ulysses
