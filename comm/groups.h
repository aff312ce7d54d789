// Process groups for DP × SP. Sequence-parallel groups are P consecutive world ranks (on a GPU
// node they share NVLink); data-parallel groups take the ranks with the same SP rank, strided
// by P. world rank = dp_rank * P + sp_rank.
#pragma once
#include <memory>

#include <mpi.h>

#include "comm/communicator.h"

namespace ulysses {

struct ProcessGroups {
  int world_rank = 0, world_size = 1;
  int sp_size = 1, sp_rank = 0;    // position inside this rank's sequence-parallel group
  int dp_size = 1, dp_rank = 0;    // index of this rank's sequence-parallel group
  std::unique_ptr<Communicator> world;     // all ranks (gradient averaging over DP × SP)
  std::unique_ptr<Communicator> sequence;  // the P ranks sharing one sequence (all-to-alls)
  std::unique_ptr<Communicator> data;      // the DP ranks with the same sp_rank
};

// Validates world_size % sequence_parallel_size == 0 (UserError otherwise) and builds the three
// communicators on `backend`. NCCL communicators come from an ncclUniqueId broadcast over MPI
// (one per group) and need the CUDA device to be selected first.
ProcessGroups make_process_groups(int sequence_parallel_size, CommBackend backend,
                                  MPI_Comm world = MPI_COMM_WORLD);

// One communicator over `comm` on the MPI backend (tests use it directly).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, std::string name);
#ifdef ULYSSES_CUDA
// One NCCL communicator over the ranks of `comm` (ncclUniqueId broadcast over `comm`).
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, std::string name);
#endif

}  // namespace ulysses
