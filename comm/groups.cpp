// Process groups for DP × SP (comm/groups.h). With P = sequence-parallel size and world rank
// w = dp_rank * P + sp_rank:
//   sequence[g] = world ranks { g*P, g*P + 1, ..., g*P + P-1 }      (consecutive: one node)
//   data[s]     = world ranks { s, s + P, s + 2P, ... }             (strided)
// Example, world 8, P 4: sequence[0] = {0,1,2,3}, sequence[1] = {4,5,6,7},
//                        data[0] = {0,4}, data[1] = {1,5}, data[2] = {2,6}, data[3] = {3,7}.
#include "comm/groups.h"

#include <string>

#include "comm/comm_util.h"
#include "core/error.h"

namespace ulysses {

namespace {

std::string divisors_of(int n) {
  std::string out;
  for (int d = 1; d <= n; d++)
    if (n % d == 0) out += (out.empty() ? "" : ", ") + std::to_string(d);
  return out;
}

std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, std::string name,
                                                CommBackend backend) {
  if (backend == CommBackend::mpi) return make_mpi_communicator(comm, std::move(name));
#ifdef ULYSSES_CUDA
  return make_nccl_communicator(comm, std::move(name));
#else
  throw_user_error("the nccl backend needs a build with CUDA (ULYSSES_CUDA=ON); use "
                   "parallel.backend=mpi");
#endif
}

}  // namespace

ProcessGroups make_process_groups(int sequence_parallel_size, CommBackend backend,
                                  MPI_Comm world) {
  ProcessGroups g;
  ULYSSES_MPI_CHECK(MPI_Comm_rank(world, &g.world_rank));
  ULYSSES_MPI_CHECK(MPI_Comm_size(world, &g.world_size));
  const int P = sequence_parallel_size;
  if (P < 1 || g.world_size % P != 0)
    throw_user_error("parallel.sequence = {} does not divide the world size {}: expected one of "
                     "{}",
                     P, g.world_size, divisors_of(g.world_size));
  g.sp_size = P;
  g.sp_rank = g.world_rank % P;
  g.dp_size = g.world_size / P;
  g.dp_rank = g.world_rank / P;

  g.world = make_communicator(world, "world", backend);

  // Split by colour; the key (world rank) keeps the group rank equal to sp_rank / dp_rank.
  MPI_Comm sequence = MPI_COMM_NULL, data = MPI_COMM_NULL;
  ULYSSES_MPI_CHECK(MPI_Comm_split(world, g.dp_rank, g.world_rank, &sequence));
  ULYSSES_MPI_CHECK(MPI_Comm_split(world, g.sp_rank, g.world_rank, &data));
  try {
    g.sequence = make_communicator(sequence, "sequence[" + std::to_string(g.dp_rank) + "]", backend);
    g.data = make_communicator(data, "data[" + std::to_string(g.sp_rank) + "]", backend);
  } catch (...) {
    MPI_Comm_free(&sequence);
    MPI_Comm_free(&data);
    throw;
  }
  ULYSSES_MPI_CHECK(MPI_Comm_free(&sequence));
  ULYSSES_MPI_CHECK(MPI_Comm_free(&data));
  ULYSSES_ASSERT(g.sequence->rank() == g.sp_rank && g.sequence->size() == P,
                 "sequence group rank {}/{} != sp rank {}/{}", g.sequence->rank(),
                 g.sequence->size(), g.sp_rank, P);
  ULYSSES_ASSERT(g.data->rank() == g.dp_rank && g.data->size() == g.dp_size,
                 "data group rank {}/{} != dp rank {}/{}", g.data->rank(), g.data->size(),
                 g.dp_rank, g.dp_size);
  return g;
}

}  // namespace ulysses
