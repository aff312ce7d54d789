#!/usr/bin/env bash
# Prepares a GPU run from the Debian machine: builds for one architecture (sm_90 by default),
# copies only the binaries the GPU check needs into a slim folder that keeps the build's layout,
# and packs the runtime bundle (Open MPI, OpenBLAS, yaml-cpp, spdlog: ../shared/gpu/README.md)
# beside them, so the folder fits the device tool's 64 MiB carry limit.
#
#   scripts/device/prepare.sh [BUILD_DIR] [CARRY_DIR]      (defaults: build-gpu, build-gpu-carry)
#   CUDA_ARCH=80 scripts/device/prepare.sh                  (A100)
#
# Then, on the GPU machine, from the repository root (build-gpu-carry travels as a carried path):
#   scripts/device/check.sh build-gpu-carry build-gpu-carry/runtime.tar.xz
# Both folder names start with "build", which .gitignore ignores.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build=${1:-build-gpu}
carry=${2:-build-gpu-carry}
arch=${CUDA_ARCH:-90}
cd "$root"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null
# what check.sh runs: the executable and every test/benchmark under tests/cuda
targets=(ulysses)
for src in tests/cuda/*.cpp; do
  name=$(basename "$src" .cpp)
  grep -q "^[^#]*\b$name\b" tests/cuda/CMakeLists.txt && targets+=("$name")
done
echo "prepare.sh: building ${targets[*]} for sm_$arch in $build"
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
rm -rf "$carry" && mkdir -p "$carry/apps" "$carry/tests/cuda"
cp "$build/apps/ulysses" "$carry/apps/"
bins=("$carry/apps/ulysses")
for t in "${targets[@]:1}"; do
  cp "$build/tests/cuda/$t" "$carry/tests/cuda/"
  bins+=("$carry/tests/cuda/$t")
done
strip --strip-debug "${bins[@]}"
"$root/../shared/gpu/make-runtime-bundle.sh" "$carry/runtime.tar.xz" "${bins[@]}"
du -sh "$carry"
size=$(du -sm "$carry" | cut -f1)
if (( size > 60 )); then
  echo "prepare.sh: $carry is ${size} MiB; the device tool carries at most 64 MiB with the working tree" >&2
  exit 1
fi
echo "prepare.sh: ready; carry \"$carry\" and run: scripts/device/check.sh $carry $carry/runtime.tar.xz"
