#!/usr/bin/env bash
# GPU check: runs the kernel test (every CUDA op against the CPU reference), the kernel benchmark,
# the trainer's GPU test (tests/cuda/test_cuda_train.cpp: cuda vs cpu, determinism, NCCL, resume;
# then SP = 4 on 4 ranks sharing the GPU through staged MPI), `ulysses check` of every collective
# on device memory (NCCL on 1 rank, staged MPI on 2 ranks sharing the GPU) and a `ulysses train`
# + `ulysses bench` smoke run on cuda, within about 12 minutes, and prints a short summary table
# last (GPU, driver, each step PASS/FAIL/SKIP, the measured ceilings, attention speed, MFU).
#
# Usage, from the repository root on the GPU machine:
#   scripts/device/check.sh [BUILD_DIR] [RUNTIME_BUNDLE]
#     BUILD_DIR       a CUDA build made on the Debian machine (default: build-gpu), e.g.
#                       cmake -S . -B build-gpu -DCMAKE_CUDA_ARCHITECTURES=90
#                       cmake --build build-gpu -j2 --target test_cuda_ops bench_cuda test_cuda_train ulysses
#     RUNTIME_BUNDLE  runtime.tar.xz from ../shared/gpu/make-runtime-bundle.sh (Open MPI, BLAS,
#                     yaml-cpp, spdlog for machines without Debian's libraries); optional, also
#                     looked for as ./runtime.tar.xz. Made with
#                       ../shared/gpu/make-runtime-bundle.sh runtime.tar.xz \
#                         build-gpu/tests/cuda/test_cuda_ops build-gpu/tests/cuda/bench_cuda \
#                         build-gpu/tests/cuda/test_cuda_train build-gpu/apps/ulysses
# Environment: CHECK_QUICK=1 runs the benchmark's quick mode (attention up to 16K only);
#              CHECK_ONLY=train skips the kernel test and benchmark (the trainer steps only).
# Exit status: 0 when every test passed (or was skipped for want of a GPU), 1 otherwise.
set -uo pipefail
build=${1:-build-gpu}
bundle=${2:-runtime.tar.xz}
log_dir=$(mktemp -d)
test_bin=$build/tests/cuda/test_cuda_ops
bench_bin=$build/tests/cuda/bench_cuda
train_test_bin=$build/tests/cuda/test_cuda_train
ulysses_bin=$build/apps/ulysses
# mpirun as root in a container; 4 ranks on a 16-core box share the one GPU
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
mpirun_cmd=(mpirun --oversubscribe)
# the tiny config with 64-wide heads (the CUDA attention's head sizes are 64 and 128)
smoke=(--set model.n_head=2 --set runtime.device=cuda --set logging.interval=10)
only=${CHECK_ONLY:-all}

if [ -f "$bundle" ]; then
  mkdir -p /tmp/ulysses-rt && tar -xJf "$bundle" -C /tmp/ulysses-rt && source /tmp/ulysses-rt/env.sh
fi
for b in "$test_bin" "$bench_bin" "$train_test_bin" "$ulysses_bin"; do
  [ -x "$b" ] || { echo "check.sh: $b not found (build it first, see the top of this script)" >&2; exit 2; }
  if ldd "$b" | grep -q "not found"; then
    echo "check.sh: unresolved libraries for $b:" >&2; ldd "$b" | grep "not found" >&2; exit 2
  fi
done

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)

verdict() {  # exit code -> PASS / SKIP / TIMEOUT / FAIL
  case $1 in 0) echo PASS ;; 77) echo SKIP ;; 124|137) echo TIMEOUT ;; *) echo "FAIL (exit $1)" ;; esac
}

test_rc=77 bench_rc=77
if [ "$only" != train ]; then
  echo "== test_cuda_ops"
  timeout 240 "$test_bin" 2>&1 | tee "$log_dir/test.log"
  test_rc=${PIPESTATUS[0]}

  echo "== bench_cuda"
  bench_args=()
  [ "${CHECK_QUICK:-0}" = 1 ] && bench_args=(--quick)
  timeout 300 "$bench_bin" "${bench_args[@]}" 2>&1 | tee "$log_dir/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
touch "$log_dir/test.log" "$log_dir/bench.log"

# step NAME TIMEOUT_S COMMAND...: runs it, logs to $log_dir/NAME.log, records its verdict
steps=()
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$log_dir/$name.log"
  local rc=${PIPESTATUS[0]}
  steps+=("$name=$rc")
}
step test_cuda_train 240 "$train_test_bin" "[one_rank]"
step test_cuda_train_np4 180 "${mpirun_cmd[@]}" -np 4 "$train_test_bin" "[four_ranks]"
step check_nccl_np1 60 "$ulysses_bin" check --set runtime.device=cuda --set parallel.backend=nccl
step check_staged_np2 90 "${mpirun_cmd[@]}" -np 2 "$ulysses_bin" check --set runtime.device=cuda \
  --set parallel.backend=mpi --set parallel.sequence=2
step train_smoke 120 "$ulysses_bin" train "${smoke[@]}" --set train.max_steps=30 --set train.sample_tokens=64
step bench_smoke 90 "$ulysses_bin" bench "${smoke[@]}" --set train.micro_batch_size=8 --warmup 2 --repeat 5

echo
echo "================ ulysses CUDA check ================"
printf "%-26s %s\n" "GPU" "${gpu:-unknown}" "driver" "${driver:-unknown}"
printf "%-26s %s\n" "test_cuda_ops" "$(verdict $test_rc)"
grep -E "^FAIL" "$log_dir/test.log" | head -20 | sed 's/^/    /'
printf "%-26s %s\n" "bench_cuda" "$(verdict $bench_rc)"
grep -E "^ceiling|^attention fwd\+bwd" "$log_dir/bench.log" | sed 's/^/    /'
grep -E "^(matmul_forward bias |layernorm_forward|crossentropy|adamw)" "$log_dir/bench.log" | sed 's/^/    /'
status=0
for entry in "${steps[@]}"; do
  name=${entry%%=*} rc=${entry##*=}
  printf "%-26s %s\n" "$name" "$(verdict "$rc")"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || status=1
  if [ "$rc" -ne 0 ]; then
    grep -E "FAILED|error|with expansion|max relative|Error" "$log_dir/$name.log" | head -12 | sed 's/^/    /'
  fi
done
grep -E "max relative loss difference" "$log_dir"/test_cuda_train*.log | sed 's/^/    /'
grep -E "step +30/30|all [0-9]+ collective checks passed" "$log_dir"/train_smoke.log "$log_dir"/check_*.log \
  | sed 's/^[^:]*:/    /'
grep -E "^ *(step|device) " "$log_dir/bench_smoke.log" | sed 's/^/    /'
rm -rf "$log_dir"
[ $test_rc -eq 0 ] || [ $test_rc -eq 77 ] || exit 1
[ $bench_rc -eq 0 ] || [ $bench_rc -eq 77 ] || exit 1
exit $status
