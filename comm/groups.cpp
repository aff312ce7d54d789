// Process groups for DP × SP and the device / backend choice (comm/groups.h). With P =
// sequence-parallel size and world rank w = dp_rank * P + sp_rank:
//   sequence[g] = world ranks { g*P, g*P + 1, ..., g*P + P-1 }      (consecutive: one node)
//   data[s]     = world ranks { s, s + P, s + 2P, ... }             (strided)
// Example, world 8, P 4: sequence[0] = {0,1,2,3}, sequence[1] = {4,5,6,7},
//                        data[0] = {0,4}, data[1] = {1,5}, data[2] = {2,6}, data[3] = {3,7}.
#include "comm/groups.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "comm/comm_util.h"
#include "core/base/error.h"

namespace ulysses {

namespace {

std::string divisors_of(int n) {
  std::string out;
  for (int d = 1; d <= n; d++)
    if (n % d == 0) out += (out.empty() ? "" : ", ") + std::to_string(d);
  return out;
}

std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, std::string name,
                                                CommBackend backend, Device device) {
  if (backend == CommBackend::mpi) {
    std::unique_ptr<Communicator> host = make_mpi_communicator(comm, std::move(name));
    if (device == Device::cpu) return host;
#ifdef ULYSSES_CUDA
    return make_staged_communicator(std::move(host));
#else
    throw_user_error("runtime.device = cuda needs a build with CUDA (ULYSSES_CUDA=ON); use "
                     "runtime.device=cpu");
#endif
  }
#ifdef ULYSSES_CUDA
  return make_nccl_communicator(comm, std::move(name));
#else
  throw_user_error("the nccl backend needs a build with CUDA (ULYSSES_CUDA=ON); use "
                   "parallel.backend=mpi");
#endif
}

}  // namespace

DeviceSurvey survey_cuda_devices(const MpiRuntime& mpi) {
  const int mine = cuda_device_count();
  // The GPU this rank would take (local_rank % count, as select_cuda_device does), by PCI bus id,
  // compared with the other ranks of the host: the same id twice is a shared GPU. Bus ids, not
  // counts, so that one visible device per rank (srun --gpus-per-task=1) is not taken for sharing.
  char bus_id[64] = {};
  if (mine > 0) std::snprintf(bus_id, sizeof(bus_id), "%s", cuda_pci_bus_id(mpi.local_rank % mine).c_str());
  MPI_Comm node = MPI_COMM_NULL;
  ULYSSES_MPI_CHECK(MPI_Comm_split_type(mpi.comm, MPI_COMM_TYPE_SHARED, mpi.world_rank, MPI_INFO_NULL, &node));
  int node_size = 1;
  ULYSSES_MPI_CHECK(MPI_Comm_size(node, &node_size));
  std::vector<char> ids(size_t(node_size) * sizeof(bus_id));
  ULYSSES_MPI_CHECK(MPI_Allgather(bus_id, int(sizeof(bus_id)), MPI_CHAR, ids.data(), int(sizeof(bus_id)), MPI_CHAR, node));
  ULYSSES_MPI_CHECK(MPI_Comm_free(&node));
  int same = 0;  // ranks of this host on this rank's GPU, itself included
  for (int r = 0; r < node_size; ++r)
    if (bus_id[0] != '\0' && std::strncmp(&ids[size_t(r) * sizeof(bus_id)], bus_id, sizeof(bus_id)) == 0) ++same;
  const int crowded = same > 1 ? 1 : 0;
  DeviceSurvey s;
  int shared = 0;
  ULYSSES_MPI_CHECK(MPI_Allreduce(&mine, &s.min_devices, 1, MPI_INT, MPI_MIN, mpi.comm));
  ULYSSES_MPI_CHECK(MPI_Allreduce(&crowded, &shared, 1, MPI_INT, MPI_MAX, mpi.comm));
  s.shared = shared != 0;
  return s;
}

Device resolve_device(const std::string& requested, const DeviceSurvey& survey, bool cuda_build) {
  if (requested == "cpu") return Device::cpu;
  if (requested == "auto") return cuda_build && survey.min_devices > 0 ? Device::cuda : Device::cpu;
  if (requested != "cuda") throw_user_error("runtime.device: expected auto, cpu or cuda, got '{}'", requested);
  if (!cuda_build)
    throw_user_error("runtime.device = cuda, but this ulysses was built without CUDA (ULYSSES_CUDA=OFF): "
                     "rebuild with CUDA, or use runtime.device=cpu (or auto)");
  if (survey.min_devices == 0)
    throw_user_error("runtime.device = cuda, but no CUDA device is visible to at least one rank (check "
                     "nvidia-smi, the driver and CUDA_VISIBLE_DEVICES), or use runtime.device=cpu (or auto)");
  return Device::cuda;
}

CommBackend resolve_comm_backend(const std::string& requested, Device device, const DeviceSurvey& survey) {
  if (requested == "mpi") return CommBackend::mpi;
  if (requested == "auto")
    return device == Device::cuda && !survey.shared ? CommBackend::nccl : CommBackend::mpi;
  if (requested != "nccl")
    throw_user_error("parallel.backend: expected auto, mpi or nccl, got '{}'", requested);
  if (device != Device::cuda)
    throw_user_error("parallel.backend = nccl moves device memory, but the run is on the cpu (runtime.device "
                     "resolved to cpu: {}); use parallel.backend=mpi (or auto)",
                     kCudaBuild ? "no CUDA device on some rank, or runtime.device=cpu" : "a build without CUDA");
  if (survey.shared)
    throw_user_error("parallel.backend = nccl needs one GPU per rank, but some host runs more ranks than it "
                     "has GPUs (NCCL refuses two ranks on one device); start at most one rank per GPU, or use "
                     "parallel.backend=mpi (or auto), which stages through host memory");
  return CommBackend::nccl;
}

DevicePlan setup_devices(const std::string& runtime_device, const std::string& parallel_backend,
                         const MpiRuntime& mpi) {
  DevicePlan plan;
  plan.survey = survey_cuda_devices(mpi);
  try {
    plan.device = resolve_device(runtime_device, plan.survey);
    plan.backend = resolve_comm_backend(parallel_backend, plan.device, plan.survey);
  } catch (const UserError& e) {
    throw AllRanksUserError(e.what());  // every rank decided alike from the agreed survey
  }
  // sharing was decided above from the survey (NCCL only on GPUs of their own)
  if (plan.device == Device::cuda) plan.cuda_device = select_cuda_device(mpi, /*allow_sharing=*/true);
  return plan;
}

void ProcessGroups::set_stream(void* cuda_stream) {
  for (Communicator* c : {world.get(), sequence.get(), data.get()})
    if (c) c->set_stream(cuda_stream);
}

void order_nccl_launches(bool concurrent) {
  if (concurrent) setenv("NCCL_LAUNCH_ORDER_IMPLICIT", "1", /*overwrite=*/0);
}

ProcessGroups make_process_groups(int sequence_parallel_size, CommBackend backend, Device device,
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

  g.world = make_communicator(world, "world", backend, device);
  if (backend == CommBackend::nccl || device == Device::cuda)
    g.host = make_mpi_communicator(world, "world (host)");

  // Split by colour; the key (world rank) keeps the group rank equal to sp_rank / dp_rank.
  MPI_Comm sequence = MPI_COMM_NULL, data = MPI_COMM_NULL;
  ULYSSES_MPI_CHECK(MPI_Comm_split(world, g.dp_rank, g.world_rank, &sequence));
  ULYSSES_MPI_CHECK(MPI_Comm_split(world, g.sp_rank, g.world_rank, &data));
  try {
    g.sequence = make_communicator(sequence, "sequence[" + std::to_string(g.dp_rank) + "]", backend, device);
    g.data = make_communicator(data, "data[" + std::to_string(g.sp_rank) + "]", backend, device);
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
