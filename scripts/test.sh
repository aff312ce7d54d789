#!/usr/bin/env bash
# The README's second command (and what CI runs): installs the Debian packages, builds
# everything (the CUDA kernels too when nvcc is found, for sm_80 and sm_90), and runs the whole
# test suite with CTest. GPU tests report SKIPPED on a machine without a GPU.
#   scripts/test.sh [extra ctest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

cuda_flags=()
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda_flags+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
echo "test: configuring build/"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${cuda_flags[@]}"
echo "test: building with $(nproc) jobs"
cmake --build build -j"$(nproc)"

if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
echo "test: running the suite"
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 600 "$@"
