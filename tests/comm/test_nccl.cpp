// The NCCL backend against the same serial references as the MPI backend
// (tests/comm/collective_cases.h), on device memory. Built only with ULYSSES_CUDA. Its own
// main exits 77 (CTest: SKIPPED) when no rank sees a GPU. One rank suffices on a one-GPU box;
// under mpirun every rank needs its own GPU.
#define CATCH_CONFIG_RUNNER
#include <cstdio>
#include <vector>

#include <cuda_runtime.h>
#include <mpi.h>

#include "comm/bootstrap.h"
#include "comm/groups.h"
#include "comm/nccl_communicator.h"
#include "core/base/error.h"
#include "tests/comm/collective_cases.h"

using namespace ulysses;
using namespace ulysses::test;

namespace {

void cuda_ok(cudaError_t rc, const char* call) {
  if (rc != cudaSuccess) FAIL(call << ": " << cudaGetErrorString(rc));
}

class DeviceMemory final : public TestMemory {
 public:
  void* alloc(size_t bytes) override {
    void* p = nullptr;
    cuda_ok(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
  }
  void release(void* p) override { (void)cudaFree(p); }
  void to_buffer(void* dst, const void* src, size_t bytes) override {
    cuda_ok(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  void from_buffer(void* dst, const void* src, size_t bytes) override {
    cuda_ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  }
};

// bf16 <-> float on the host (round to nearest even), for the bf16 reduction reference.
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

TEST_CASE("nccl communicator: every collective against the serial reference", "[comm][nccl]") {
  auto c = make_nccl_communicator(MPI_COMM_WORLD, "world");
  REQUIRE(c->backend() == CommBackend::nccl);
  DeviceMemory dev;
  check_every_collective(*c, dev);
}

TEST_CASE("nccl communicator: byte counters match the MPI convention", "[comm][nccl]") {
  auto c = make_nccl_communicator(MPI_COMM_WORLD, "world");
  DeviceMemory dev;
  check_counters(*c, dev);
}

TEST_CASE("nccl communicator: bf16 all_reduce sum and avg", "[comm][nccl][bf16]") {
  auto c = make_nccl_communicator(MPI_COMM_WORLD, "world");
  DeviceMemory dev;
  const int p = c->size(), r = c->rank();
  const size_t n = 513;
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max}) {
    // Inputs are bf16-representable; the reference sums them in double.
    auto input = [&](int rank) {
      std::vector<float> f = rank_data<float>(rank, 60, n);
      std::vector<uint16_t> h(n);
      for (size_t i = 0; i < n; i++) h[i] = to_bf16(f[i]);
      return h;
    };
    TestBuffer<uint16_t> buf(dev, input(r));
    c->all_reduce(buf.data(), buf.data(), n, DType::bf16, op);
    c->synchronize();
    std::vector<uint16_t> got = buf.read();
    std::vector<double> want(n, op == ReduceOp::max ? -1e300 : 0.0);
    for (int q = 0; q < p; q++) {
      std::vector<uint16_t> x = input(q);
      for (size_t i = 0; i < n; i++)
        want[i] = op == ReduceOp::max ? std::max(want[i], double(from_bf16(x[i])))
                                      : want[i] + double(from_bf16(x[i]));
    }
    std::vector<float> got_f(n);
    for (size_t i = 0; i < n; i++) {
      got_f[i] = from_bf16(got[i]);
      if (op == ReduceOp::avg) want[i] /= double(p);
    }
    // bf16 keeps 8 significant bits; p - 1 roundings of partial sums
    require_close(got_f, want, double(p) * 1.0 / 128.0, "bf16 all_reduce");
  }
}

TEST_CASE("nccl communicator: errors name collective, group and rank", "[comm][nccl]") {
  auto c = make_nccl_communicator(MPI_COMM_WORLD, "world");
  DeviceMemory dev;
  TestBuffer<uint16_t> buf(dev, 8);
  CHECK_THROWS_WITH(c->all_reduce(buf.data(), buf.data(), 8, DType::u16, ReduceOp::sum),
                    Catch::Contains("nccl all_reduce on group 'world' rank") &&
                        Catch::Contains("unsupported"));
  CHECK_THROWS_WITH(c->broadcast(buf.data(), 1, DType::bf16, c->size()), Catch::Contains("root"));
  c->barrier();
}

TEST_CASE("nccl process groups: sequence and data groups reduce over their members",
          "[comm][nccl][groups]") {
  int world = 1, me = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  ProcessGroups g = make_process_groups(world, CommBackend::nccl);
  DeviceMemory dev;
  TestBuffer<double> x(dev, std::vector<double>{double(me)});
  g.sequence->all_reduce(x.data(), x.data(), 1, DType::f64, ReduceOp::sum);
  g.sequence->synchronize();
  CHECK(x.read()[0] == double(world * (world - 1) / 2));
}

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  int gpus = cuda_device_count(), min_gpus = 0;
  MPI_Allreduce(&gpus, &min_gpus, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (min_gpus == 0) {
    if (mpi.world_rank == 0) std::printf("test_comm_nccl: no CUDA device visible: SKIPPED\n");
    return 77;
  }
  int result = 0;
  try {
    select_cuda_device(mpi, /*allow_sharing=*/false);
    result = Catch::Session().run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_comm_nccl: rank %d: %s\n", mpi.world_rank, e.what());
    mpi.abort(1);
  }
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
