// The choice of device and communication backend (comm/groups.h: resolve_device,
// resolve_comm_backend, setup_devices) for every combination of request, GPU count and GPU
// sharing; the process groups' host communicator; watchdog regions (comm/watchdog.h); the GPU
// peak table of `ulysses bench` (core/bench.h). Runs without a GPU (and, where the machine has
// none, checks that asking for cuda is a UserError naming runtime.device).
#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <thread>

#include "comm/bootstrap.h"
#include "comm/groups.h"
#include "comm/watchdog.h"
#include "core/bench.h"
#include "core/base/error.h"

using namespace ulysses;

namespace {
const DeviceSurvey kNoGpu{0, false};
const DeviceSurvey kOwnGpus{8, false};     // every rank a GPU of its own
const DeviceSurvey kSharedGpus{1, true};   // e.g. 4 ranks on one GPU
}  // namespace

TEST_CASE("runtime.device resolves to cpu or cuda, or names the key", "[comm][device]") {
  for (bool build : {false, true}) {
    CAPTURE(build);
    CHECK(resolve_device("cpu", kOwnGpus, build) == Device::cpu);
    CHECK(resolve_device("cpu", kNoGpu, build) == Device::cpu);
    CHECK(resolve_device("auto", kNoGpu, build) == Device::cpu);
    CHECK(resolve_device("auto", kOwnGpus, build) == (build ? Device::cuda : Device::cpu));
    CHECK(resolve_device("auto", kSharedGpus, build) == (build ? Device::cuda : Device::cpu));
    CHECK_THROWS_WITH(resolve_device("tpu", kOwnGpus, build),
                      Catch::Contains("runtime.device") && Catch::Contains("'tpu'"));
  }
  CHECK(resolve_device("cuda", kOwnGpus, true) == Device::cuda);
  CHECK(resolve_device("cuda", kSharedGpus, true) == Device::cuda);
  CHECK_THROWS_WITH(resolve_device("cuda", kOwnGpus, false),
                    Catch::Contains("runtime.device = cuda") && Catch::Contains("built without CUDA"));
  CHECK_THROWS_WITH(resolve_device("cuda", kNoGpu, true),
                    Catch::Contains("runtime.device = cuda") && Catch::Contains("no CUDA device is visible"));
  CHECK_THROWS_AS(resolve_device("cuda", kNoGpu, true), UserError);
}

TEST_CASE("parallel.backend: nccl on own GPUs, MPI (staged) on shared ones, errors name the key",
          "[comm][device]") {
  for (const DeviceSurvey& s : {kNoGpu, kOwnGpus, kSharedGpus}) {
    CHECK(resolve_comm_backend("mpi", Device::cpu, s) == CommBackend::mpi);
    CHECK(resolve_comm_backend("auto", Device::cpu, s) == CommBackend::mpi);
    CHECK_THROWS_WITH(resolve_comm_backend("nccl", Device::cpu, s),
                      Catch::Contains("parallel.backend = nccl") && Catch::Contains("cpu"));
    CHECK_THROWS_WITH(resolve_comm_backend("gloo", Device::cpu, s),
                      Catch::Contains("parallel.backend") && Catch::Contains("'gloo'"));
  }
  CHECK(resolve_comm_backend("auto", Device::cuda, kOwnGpus) == CommBackend::nccl);
  CHECK(resolve_comm_backend("auto", Device::cuda, kSharedGpus) == CommBackend::mpi);
  CHECK(resolve_comm_backend("mpi", Device::cuda, kOwnGpus) == CommBackend::mpi);
  CHECK(resolve_comm_backend("mpi", Device::cuda, kSharedGpus) == CommBackend::mpi);
  CHECK(resolve_comm_backend("nccl", Device::cuda, kOwnGpus) == CommBackend::nccl);
  CHECK_THROWS_WITH(resolve_comm_backend("nccl", Device::cuda, kSharedGpus),
                    Catch::Contains("parallel.backend = nccl") && Catch::Contains("one GPU per rank"));
}

TEST_CASE("setup_devices on this machine agrees over the ranks", "[comm][device]") {
  MpiRuntime mpi(nullptr, nullptr);
  const DeviceSurvey s = survey_cuda_devices(mpi);
  if (cuda_device_count() == 0) CHECK(s.min_devices == 0);
  CHECK(s.min_devices <= cuda_device_count());
  const DevicePlan cpu = setup_devices("cpu", "auto", mpi);
  CHECK(cpu.device == Device::cpu);
  CHECK(cpu.backend == CommBackend::mpi);
  CHECK(cpu.cuda_device == -1);
  if (s.min_devices == 0) {
    // no GPU on some rank: auto falls back to the cpu; asking for cuda is an error every rank
    // raises alike (printed once, exit 2)
    const DevicePlan plan = setup_devices("auto", "auto", mpi);
    CHECK(plan.device == Device::cpu);
    CHECK(plan.backend == CommBackend::mpi);
    CHECK_THROWS_AS(setup_devices("cuda", "auto", mpi), AllRanksUserError);
    CHECK_THROWS_WITH(setup_devices("cuda", "mpi", mpi), Catch::Contains("runtime.device = cuda"));
    CHECK_THROWS_AS(setup_devices("auto", "nccl", mpi), AllRanksUserError);
  }
}

TEST_CASE("process groups on the cpu need no host communicator", "[comm][groups]") {
  MpiRuntime mpi(nullptr, nullptr);
  ProcessGroups g = make_process_groups(1, CommBackend::mpi);
  CHECK(g.host == nullptr);
  CHECK(&g.host_world() == g.world.get());
  g.set_stream(nullptr);  // ignored by MPI on the cpu
  double x = 1.0;
  g.host_world().all_reduce(&x, &x, 1, DType::f64, ReduceOp::sum);
  CHECK(x == double(mpi.world_size));
#ifndef ULYSSES_CUDA
  CHECK_THROWS_WITH(make_process_groups(1, CommBackend::mpi, Device::cuda), Catch::Contains("runtime.device = cuda"));
#endif
}

TEST_CASE("watchdog: a region outlives the collectives inside it and fires with its name", "[comm][watchdog]") {
  std::string message;
  {
    Watchdog dog(0, 0.2, [&](const std::string& m) { message = m; });
    dog.set_step(7);
    {
      WatchedRegion region(dog, true, "forward/backward (NCCL all-to-alls)", "sequence[0]");
      dog.enter("all_to_all", "sequence[0]");  // a collective inside returns at once ...
      dog.leave();
      // ... and the region (a host wait on the device) goes on
      const auto t0 = std::chrono::steady_clock::now();
      while (!dog.fired() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK(dog.fired());
  }
  CHECK_THAT(message, Catch::Contains("forward/backward (NCCL all-to-alls) on group 'sequence[0]' at step 7"));
  // a disabled region watches nothing
  Watchdog quiet(0, 0.1, [&](const std::string&) { FAIL("fired"); });
  {
    WatchedRegion region(quiet, false, "never", "world");
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  CHECK(!quiet.fired());
}

TEST_CASE("bench: peak bf16 TFLOP/s by GPU name", "[bench]") {
  CHECK(peak_bf16_tflops("NVIDIA H100 80GB HBM3") == Approx(989.4));
  CHECK(peak_bf16_tflops("NVIDIA H100 PCIe") == Approx(756.5));
  CHECK(peak_bf16_tflops("NVIDIA H200") == Approx(989.4));
  CHECK(peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == Approx(312.0));
  CHECK(peak_bf16_tflops("NVIDIA A100-PCIE-40GB") == Approx(312.0));
  CHECK(peak_bf16_tflops("NVIDIA H100 NVL") == 0.0);
  CHECK(peak_bf16_tflops("NVIDIA GeForce RTX 4090") == 0.0);
  CHECK(peak_bf16_tflops("") == 0.0);
}
