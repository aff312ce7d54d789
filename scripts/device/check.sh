#!/usr/bin/env bash
# GPU check of the CUDA kernels: runs the kernel test (every CUDA op against the CPU reference)
# and the kernel benchmark on a GPU machine, within about 8 minutes, and prints a short summary
# table last (GPU, driver, each test PASS/FAIL/SKIP, the measured ceilings and attention speed).
#
# Usage, from the repository root on the GPU machine:
#   scripts/device/check.sh [BUILD_DIR] [RUNTIME_BUNDLE]
#     BUILD_DIR       a CUDA build made on the Debian machine (default: build-gpu), e.g.
#                       cmake -S . -B build-gpu -DCMAKE_CUDA_ARCHITECTURES=90
#                       cmake --build build-gpu -j2 --target test_cuda_ops bench_cuda
#     RUNTIME_BUNDLE  runtime.tar.xz from ../shared/gpu/make-runtime-bundle.sh (Open MPI, BLAS,
#                     yaml-cpp, spdlog for machines without Debian's libraries); optional, also
#                     looked for as ./runtime.tar.xz. Made with
#                       ../shared/gpu/make-runtime-bundle.sh runtime.tar.xz \
#                         build-gpu/tests/cuda/test_cuda_ops build-gpu/tests/cuda/bench_cuda
# Environment: CHECK_QUICK=1 runs the benchmark's quick mode (attention up to 16K only).
# Exit status: 0 when every test passed (or was skipped for want of a GPU), 1 otherwise.
set -uo pipefail
build=${1:-build-gpu}
bundle=${2:-runtime.tar.xz}
log_dir=$(mktemp -d)
test_bin=$build/tests/cuda/test_cuda_ops
bench_bin=$build/tests/cuda/bench_cuda

if [ -f "$bundle" ]; then
  mkdir -p /tmp/ulysses-rt && tar -xJf "$bundle" -C /tmp/ulysses-rt && source /tmp/ulysses-rt/env.sh
fi
for b in "$test_bin" "$bench_bin"; do
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

echo "== test_cuda_ops"
timeout 240 "$test_bin" 2>&1 | tee "$log_dir/test.log"
test_rc=${PIPESTATUS[0]}

echo "== bench_cuda"
bench_args=()
[ "${CHECK_QUICK:-0}" = 1 ] && bench_args=(--quick)
timeout 300 "$bench_bin" "${bench_args[@]}" 2>&1 | tee "$log_dir/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "================ ulysses CUDA check ================"
printf "%-26s %s\n" "GPU" "${gpu:-unknown}" "driver" "${driver:-unknown}"
printf "%-26s %s\n" "test_cuda_ops" "$(verdict $test_rc)"
grep -E "^FAIL" "$log_dir/test.log" | head -20 | sed 's/^/    /'
printf "%-26s %s\n" "bench_cuda" "$(verdict $bench_rc)"
grep -E "^ceiling|^attention fwd\+bwd" "$log_dir/bench.log" | sed 's/^/    /'
grep -E "^(matmul_forward bias |layernorm_forward|crossentropy|adamw)" "$log_dir/bench.log" | sed 's/^/    /'
rm -rf "$log_dir"
[ $test_rc -eq 0 ] || [ $test_rc -eq 77 ] || exit 1
[ $bench_rc -eq 0 ] || [ $bench_rc -eq 77 ] || exit 1
exit 0
