// MPI bootstrap: initialises MPI (thread level FUNNELED), reads world and node-local rank
// (MPI_Comm_split_type SHARED), and picks this rank's GPU by local rank. Works under mpirun,
// under srun with PMIx, and as a single process with no launcher (world size 1).
// Knows nothing of tensors or models.
#pragma once
#include <string>

#include <mpi.h>

namespace ulysses {

struct MpiRuntime {
  // Calls MPI_Init_thread unless MPI is already initialised (tests initialise it themselves).
  MpiRuntime(int* argc, char*** argv);
  // A runtime over `comm` of an MPI that is already initialised, e.g. MPI_COMM_SELF for a
  // one-rank run inside a larger job (tests). Ranks and local ranks are those within `comm`.
  explicit MpiRuntime(MPI_Comm comm);
  ~MpiRuntime();  // MPI_Finalize if this object initialised MPI
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  MPI_Comm comm = MPI_COMM_WORLD;  // the ranks of the job (not owned)
  int world_rank = 0;
  int world_size = 1;
  int local_rank = 0;   // rank among the processes on this node
  int local_size = 1;
  std::string hostname;
  bool owns_mpi = false;

  // Ends every rank of the job with `code` (MPI_Abort); used when one rank hits an error the
  // others cannot know about, so nobody hangs.
  [[noreturn]] void abort(int code) const;
};

// Selects the CUDA device for this rank: local_rank when local_size <= device count, otherwise a
// UserError saying how many local ranks and GPUs there are (unless `allow_sharing`, where ranks
// share GPUs round-robin, local_rank % count: the MPI backend allows it, NCCL does not). Also
// makes this thread's CUDA error messages name the world rank (cuda::set_cuda_check_rank).
// Returns the device index. Throws when built without CUDA or when no GPU is visible.
int select_cuda_device(const MpiRuntime& mpi, bool allow_sharing);
// Number of visible CUDA devices; 0 without CUDA support or without a GPU (never throws).
int cuda_device_count();
// PCI bus id ("0000:3b:00.0") of visible CUDA device `device`: names the physical GPU whatever
// CUDA_VISIBLE_DEVICES maps to it; "" without CUDA or on failure (never throws).
std::string cuda_pci_bus_id(int device);

}  // namespace ulysses
