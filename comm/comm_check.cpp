// `ulysses check` (comm/comm_check.h): builds the DP × SP process groups for the configured
// sequence-parallel size on the backend the config resolves to, runs every collective on every
// group (world, sequence, data) with known per-rank data, checks each result against what it
// must be, and prints on rank 0 the ranks, hosts, devices, group layout and a table of
// collective × group → OK/FAILED and bytes sent (summed over all ranks).
//
// Known data: rank r's element i is v(r, i), a small integer, so sums over thousands of ranks
// are exact in f32 and any wrong block, offset or peer shows up as a wrong value.
#include "comm/comm_check.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include <mpi.h>
#include <spdlog/spdlog.h>

#include "comm/comm_util.h"
#include "comm/groups.h"
#include "core/base/error.h"

namespace ulysses {

namespace {

float known_value(int rank, size_t i) {
  return float(int((uint64_t(rank) * 7919 + uint64_t(i) * 31) % 4093) - 2046);
}

// Buffers in the memory the communicator works on: host for MPI, device for NCCL.
class CheckMemory {
 public:
  explicit CheckMemory(bool on_device) : on_device_(on_device) {}
  CheckMemory(const CheckMemory&) = delete;
  CheckMemory& operator=(const CheckMemory&) = delete;
  ~CheckMemory() {
    for (void* p : owned_) release(p);
  }
  // A buffer holding `values` (its size in elements is values.size()).
  template <typename T>
  void* make(const std::vector<T>& values) {
    void* p = allocate(std::max<size_t>(1, values.size()) * sizeof(T));
    put(p, values.data(), values.size() * sizeof(T));
    return p;
  }
  template <typename T>
  std::vector<T> read(const void* p, size_t count) {
    std::vector<T> out(count);
    get(out.data(), p, count * sizeof(T));
    return out;
  }

 private:
  void* allocate(size_t bytes) {
    void* p = nullptr;
    if (on_device_) {
#ifdef ULYSSES_CUDA
      ULYSSES_COMM_CUDA_CHECK(cudaMalloc(&p, bytes));
#endif
    } else {
      p = ::operator new(bytes);
    }
    owned_.push_back(p);
    return p;
  }
  void put(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return;
#ifdef ULYSSES_CUDA
    if (on_device_) {
      ULYSSES_COMM_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }
  void get(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return;
#ifdef ULYSSES_CUDA
    if (on_device_) {
      ULYSSES_COMM_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }
  void release(void* p) {
#ifdef ULYSSES_CUDA
    if (on_device_) {
      (void)cudaFree(p);
      return;
    }
#endif
    ::operator delete(p);
  }
  bool on_device_;
  std::vector<void*> owned_;
};

bool close(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return false;
  for (size_t i = 0; i < got.size(); i++)
    if (!(std::fabs(got[i] - want[i]) <= 1e-5f * std::max(1.0f, std::fabs(want[i])))) return false;
  return true;
}

// One collective on one group: runs it with known data and says whether the result is right.
// Every rank of the group runs the same case with the same sizes.
using CheckCase = std::function<bool(Communicator&, CheckMemory&)>;

struct NamedCase {
  const char* name;
  CheckCase run;
};

constexpr size_t kBlock = 1027;  // elements per block: odd, so block offsets are not all aligned

bool check_all_to_all(Communicator& c, CheckMemory& m) {
  const size_t n = kBlock;
  const int p = c.size(), r = c.rank();
  std::vector<float> send(size_t(p) * n), want(size_t(p) * n);
  for (size_t i = 0; i < send.size(); i++) send[i] = known_value(r, i);
  for (int src = 0; src < p; src++)  // block src of recv = block r of src's send
    for (size_t k = 0; k < n; k++) want[size_t(src) * n + k] = known_value(src, size_t(r) * n + k);
  void* s = m.make(send);
  void* d = m.make(std::vector<float>(want.size(), -9999.0f));
  c.all_to_all(s, d, n, DType::f32);
  c.synchronize();
  return close(m.read<float>(d, want.size()), want);
}

// Rank a sends ((a + b) % 3) * 257 elements to rank b: some pairs send nothing.
bool check_all_to_allv(Communicator& c, CheckMemory& m) {
  const int p = c.size(), r = c.rank();
  auto pair_count = [](int a, int b) { return size_t((a + b) % 3) * 257; };
  const size_t np = static_cast<size_t>(p);
  std::vector<size_t> sc(np), sd(np), rc(np), rd(np);
  size_t send_total = 0, recv_total = 0;
  for (int j = 0; j < p; j++) {
    sc[size_t(j)] = pair_count(r, j), sd[size_t(j)] = send_total, send_total += sc[size_t(j)];
    rc[size_t(j)] = pair_count(j, r), rd[size_t(j)] = recv_total, recv_total += rc[size_t(j)];
  }
  std::vector<float> send(send_total), want(recv_total);
  for (size_t i = 0; i < send_total; i++) send[i] = known_value(r, i);
  for (int src = 0; src < p; src++) {
    size_t src_displ = 0;  // where src's block for r starts in src's send buffer
    for (int j = 0; j < r; j++) src_displ += pair_count(src, j);
    for (size_t k = 0; k < rc[size_t(src)]; k++) want[rd[size_t(src)] + k] = known_value(src, src_displ + k);
  }
  void* s = m.make(send);
  void* d = m.make(std::vector<float>(recv_total, -9999.0f));
  c.all_to_allv(s, sc.data(), sd.data(), d, rc.data(), rd.data(), DType::f32);
  c.synchronize();
  return close(m.read<float>(d, recv_total), want);
}

CheckCase all_reduce_case(ReduceOp op, bool in_place) {
  return [op, in_place](Communicator& c, CheckMemory& m) {
    const size_t n = kBlock;
    const int p = c.size(), r = c.rank();
    std::vector<float> send(n), want(n);
    for (size_t i = 0; i < n; i++) {
      send[i] = known_value(r, i);
      float acc = op == ReduceOp::max ? -1e30f : 0.0f;
      for (int q = 0; q < p; q++)
        acc = op == ReduceOp::max ? std::max(acc, known_value(q, i)) : acc + known_value(q, i);
      want[i] = op == ReduceOp::avg ? acc / float(p) : acc;
    }
    void* s = m.make(send);
    void* d = in_place ? s : m.make(std::vector<float>(n, -9999.0f));
    c.all_reduce(s, d, n, DType::f32, op);
    c.synchronize();
    return close(m.read<float>(d, n), want);
  };
}

bool check_reduce_scatter(Communicator& c, CheckMemory& m) {
  const size_t n = kBlock;
  const int p = c.size(), r = c.rank();
  std::vector<float> send(size_t(p) * n), want(n, 0.0f);
  for (size_t i = 0; i < send.size(); i++) send[i] = known_value(r, i);
  for (int q = 0; q < p; q++)
    for (size_t k = 0; k < n; k++) want[k] += known_value(q, size_t(r) * n + k);
  void* s = m.make(send);
  void* d = m.make(std::vector<float>(n, -9999.0f));
  c.reduce_scatter(s, d, n, DType::f32, ReduceOp::sum);
  c.synchronize();
  return close(m.read<float>(d, n), want);
}

bool check_all_gather(Communicator& c, CheckMemory& m) {
  const size_t n = kBlock;
  const int p = c.size(), r = c.rank();
  std::vector<float> send(n), want(size_t(p) * n);
  for (size_t k = 0; k < n; k++) send[k] = known_value(r, k);
  for (int q = 0; q < p; q++)
    for (size_t k = 0; k < n; k++) want[size_t(q) * n + k] = known_value(q, k);
  void* s = m.make(send);
  void* d = m.make(std::vector<float>(want.size(), -9999.0f));
  c.all_gather(s, d, n, DType::f32);
  c.synchronize();
  return close(m.read<float>(d, want.size()), want);
}

bool check_broadcast_from_last(Communicator& c, CheckMemory& m) {
  const size_t n = kBlock;
  const int root = c.size() - 1;
  std::vector<float> buf(n, -9999.0f), want(n);
  for (size_t k = 0; k < n; k++) want[k] = known_value(root, k);
  if (c.rank() == root) buf = want;
  void* b = m.make(buf);
  c.broadcast(b, n, DType::f32, root);
  c.synchronize();
  return close(m.read<float>(b, n), want);
}

// The group holds exactly the world ranks the layout says, in order (an i32 all_gather).
CheckCase membership_case(const std::vector<int>& expected_members) {
  return [expected_members](Communicator& c, CheckMemory& m) {
    int world_rank = 0;
    ULYSSES_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
    void* s = m.make(std::vector<int32_t>{world_rank});
    void* d = m.make(std::vector<int32_t>(size_t(c.size()), -1));
    c.all_gather(s, d, 1, DType::i32);
    c.synchronize();
    std::vector<int32_t> got = m.read<int32_t>(d, size_t(c.size()));
    return std::vector<int>(got.begin(), got.end()) == expected_members;
  };
}

std::vector<NamedCase> check_cases(const std::vector<int>& expected_members) {
  return {
      {"all_to_all", check_all_to_all},
      {"all_to_allv", check_all_to_allv},
      {"all_reduce sum", all_reduce_case(ReduceOp::sum, false)},
      {"all_reduce avg (in place)", all_reduce_case(ReduceOp::avg, true)},
      {"all_reduce max", all_reduce_case(ReduceOp::max, false)},
      {"reduce_scatter sum", check_reduce_scatter},
      {"all_gather", check_all_gather},
      {"broadcast (root = last)", check_broadcast_from_last},
      {"barrier", [](Communicator& c, CheckMemory&) { c.barrier(); return true; }},
      {"membership", membership_case(expected_members)},
  };
}

std::string human_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) v /= 1024.0, u++;
  return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::string out;
  for (size_t i = 0; i < ranks.size(); i++) {
    if (i == 8 && ranks.size() > 10) {
      out += fmt::format(", ... ({} more)", ranks.size() - i);
      break;
    }
    out += (i ? ", " : "") + std::to_string(ranks[i]);
  }
  return "{" + out + "}";
}

std::vector<int> sequence_members(int group, int P) {
  std::vector<int> m;
  for (int i = 0; i < P; i++) m.push_back(group * P + i);
  return m;
}
std::vector<int> data_members(int sp_rank, int P, int DP) {
  std::vector<int> m;
  for (int i = 0; i < DP; i++) m.push_back(sp_rank + i * P);
  return m;
}

struct RankInfo {
  char host[MPI_MAX_PROCESSOR_NAME];
  int local_rank, local_size, device, sp_rank, dp_rank;
};

// Who is where: one RankInfo per rank gathered on rank 0, which prints the ranks, hosts,
// devices and the group layout.
void print_layout(const MpiRuntime& mpi, const DevicePlan& plan, const ProcessGroups& groups) {
  const int P = groups.sp_size, DP = groups.dp_size;
  RankInfo mine{};
  std::snprintf(mine.host, sizeof(mine.host), "%s", mpi.hostname.c_str());
  mine.local_rank = mpi.local_rank, mine.local_size = mpi.local_size, mine.device = plan.cuda_device;
  mine.sp_rank = groups.sp_rank, mine.dp_rank = groups.dp_rank;
  std::vector<RankInfo> all(mpi.world_rank == 0 ? size_t(mpi.world_size) : 0);
  ULYSSES_MPI_CHECK(MPI_Gather(&mine, int(sizeof(RankInfo)), MPI_BYTE, all.data(),
                               int(sizeof(RankInfo)), MPI_BYTE, 0, MPI_COMM_WORLD));
  if (mpi.world_rank != 0) return;
  std::set<std::string> hosts;
  for (const RankInfo& ri : all) hosts.insert(ri.host);
  std::string host_list;
  for (const std::string& h : hosts) host_list += (host_list.empty() ? "" : ", ") + h;
  spdlog::info("check: {} rank(s) on {} host(s) [{}], device {}, backend {}{}", mpi.world_size, hosts.size(),
               host_list, device_name(plan.device), comm_backend_name(plan.backend),
               plan.backend == CommBackend::mpi && plan.device == Device::cuda ? " (staged through pinned host memory)"
                                                                              : "");
  spdlog::info("  {:>5}  {:<20} {:>7}  {:>6}  {:>7}  {:>7}", "rank", "host", "local", "device",
               "sp_rank", "dp_rank");
  const size_t shown = std::min<size_t>(all.size(), 64);
  for (size_t r = 0; r < shown; r++) {
    const RankInfo& ri = all[r];
    spdlog::info("  {:>5}  {:<20} {:>7}  {:>6}  {:>7}  {:>7}", r, ri.host,
                 fmt::format("{}/{}", ri.local_rank, ri.local_size),
                 ri.device < 0 ? std::string("cpu") : fmt::format("cuda:{}", ri.device),
                 ri.sp_rank, ri.dp_rank);
  }
  if (shown < all.size()) spdlog::info("  ... {} more rank(s)", all.size() - shown);
  spdlog::info("layout: sequence parallel P = {} x data parallel DP = {}", P, DP);
  for (int g = 0; g < std::min(DP, 16); g++)
    spdlog::info("  sequence[{}] = {}", g, join_ranks(sequence_members(g, P)));
  if (DP > 16) spdlog::info("  ... {} more sequence group(s)", DP - 16);
  for (int s = 0; s < std::min(P, 16); s++)
    spdlog::info("  data[{}] = {}", s, join_ranks(data_members(s, P, DP)));
  if (P > 16) spdlog::info("  ... {} more data group(s)", P - 16);
}

struct GroupUnderTest {
  const char* kind;
  Communicator* comm;
  std::vector<int> members;
};

// What each group x case gave: ok (this rank's verdict, 1 or 0) and bytes sent, [group][case].
struct Verdicts {
  std::vector<int> ok;
  std::vector<unsigned long long> bytes;
};

// Every case on every group, on this rank. A collective that throws may leave the group's other
// ranks waiting inside it: the whole job is ended then rather than left to hang.
Verdicts run_cases(MpiRuntime& mpi, const std::vector<GroupUnderTest>& under_test, CheckMemory& memory) {
  const size_t n_cases = check_cases({}).size();
  Verdicts v{std::vector<int>(under_test.size() * n_cases, 0),
             std::vector<unsigned long long>(under_test.size() * n_cases, 0)};
  for (size_t g = 0; g < under_test.size(); g++) {
    Communicator& c = *under_test[g].comm;
    std::vector<NamedCase> cases = check_cases(under_test[g].members);
    for (size_t k = 0; k < cases.size(); k++) {
      const uint64_t before = c.counters().total_bytes_sent();
      try {
        v.ok[g * n_cases + k] = cases[k].run(c, memory) ? 1 : 0;
      } catch (const std::exception& e) {
        spdlog::error("check: rank {}: {} on group '{}' threw: {}", mpi.world_rank, cases[k].name,
                      c.name(), e.what());
        mpi.abort(1);
      }
      v.bytes[g * n_cases + k] = c.counters().total_bytes_sent() - before;
      if (!v.ok[g * n_cases + k])
        spdlog::error("check: rank {}: {} on group '{}' gave wrong values", mpi.world_rank,
                      cases[k].name, c.name());
    }
  }
  return v;
}

// The world's verdict (a case passes when it passed on every rank) as a table on rank 0:
// collective x group -> OK / FAILED and the bytes sent summed over the ranks. Returns the
// number of failed checks (the same on every rank).
int report_verdicts(const MpiRuntime& mpi, const std::vector<GroupUnderTest>& under_test, const Verdicts& mine) {
  std::vector<int> ok(mine.ok.size(), 0);
  std::vector<unsigned long long> bytes(mine.bytes.size(), 0);
  ULYSSES_MPI_CHECK(MPI_Allreduce(mine.ok.data(), ok.data(), int(ok.size()), MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  ULYSSES_MPI_CHECK(MPI_Reduce(mine.bytes.data(), bytes.data(), int(bytes.size()), MPI_UNSIGNED_LONG_LONG,
                               MPI_SUM, 0, MPI_COMM_WORLD));
  const int total = int(ok.size());
  const int failed = total - int(std::count(ok.begin(), ok.end(), 1));
  if (mpi.world_rank != 0) return failed;
  const std::vector<NamedCase> names = check_cases({});
  spdlog::info("collectives (bytes sent, summed over ranks):");
  spdlog::info("  {:<26} {:<20} {:<20} {:<20}", "", "world", "sequence", "data");
  for (size_t k = 0; k < names.size(); k++) {
    std::string row = fmt::format("  {:<26}", names[k].name);
    for (size_t g = 0; g < under_test.size(); g++) {
      const size_t i = g * names.size() + k;
      row += fmt::format(" {:<20}", fmt::format("{} {}", ok[i] ? "OK" : "FAILED", human_bytes(bytes[i])));
    }
    spdlog::info("{}", row);
  }
  if (failed == 0)
    spdlog::info("check: all {} collective checks passed on {} rank(s)", total, mpi.world_size);
  else
    spdlog::error("check: {} of {} collective checks FAILED", failed, total);
  return failed;
}

}  // namespace

int run_comm_check(const CommCheckOptions& opt, MpiRuntime& mpi) {
  // the device and backend as `ulysses train` would choose them (comm/groups.h)
  const DevicePlan plan = setup_devices(opt.device, opt.backend, mpi);
  ProcessGroups groups = make_process_groups(opt.sequence, plan.backend, plan.device, mpi.comm);
  const int P = groups.sp_size, DP = groups.dp_size;
  print_layout(mpi, plan, groups);

  std::vector<int> world_members(size_t(mpi.world_size));
  for (int i = 0; i < mpi.world_size; i++) world_members[size_t(i)] = i;
  const std::vector<GroupUnderTest> under_test = {
      {"world", groups.world.get(), world_members},
      {"sequence", groups.sequence.get(), sequence_members(groups.dp_rank, P)},
      {"data", groups.data.get(), data_members(groups.sp_rank, P, DP)},
  };
  // device memory for NCCL and for MPI on cuda (staged through host memory)
  CheckMemory memory(plan.backend == CommBackend::nccl || plan.device == Device::cuda);
  const Verdicts mine = run_cases(mpi, under_test, memory);
  return report_verdicts(mpi, under_test, mine) == 0 ? 0 : 1;
}

}  // namespace ulysses
