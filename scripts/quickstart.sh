#!/usr/bin/env bash
# The README's first command: installs the Debian packages, builds ulysses, turns the license
# texts under /usr/share/common-licenses into byte-level token shards, and trains a small GPT on
# them with sequence parallelism over 2 MPI ranks, printing a sample at the end.
#   scripts/quickstart.sh            (run from anywhere; works in the repository root)
# Outputs go to out/: data/ (shards), quickstart_metrics.jsonl, quickstart_checkpoints/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# The quick start trains on the CPU, so it builds without the CUDA kernels (minutes less on a
# small machine). scripts/test.sh builds everything, CUDA included when nvcc is there.
echo "quickstart: building (CPU-only) into build-quickstart/"
cmake -S . -B build-quickstart -DCMAKE_BUILD_TYPE=Release -DULYSSES_CUDA=OFF -DULYSSES_TESTS=OFF > /dev/null
cmake --build build-quickstart -j"$(nproc)" --target ulysses

mkdir -p out
texts=()
for f in /usr/share/common-licenses/*; do
  [ -f "$f" ] && [ ! -L "$f" ] && texts+=("$f")   # skip the symlinks (GPL -> GPL-3, ...)
done
[ ${#texts[@]} -gt 0 ] || { echo "quickstart: no texts under /usr/share/common-licenses" >&2; exit 1; }
build-quickstart/apps/ulysses prepare "${texts[@]}" --out out/data --name licenses --val-fraction 0.1

launcher=(mpirun -np 2)
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
if [ "$(nproc)" -lt 2 ]; then launcher+=(--oversubscribe); fi
rm -rf out/quickstart_checkpoints out/quickstart_metrics.jsonl
echo "quickstart: training (2 ranks, sequence-parallel degree 2)"
"${launcher[@]}" build-quickstart/apps/ulysses train --config configs/quickstart.yaml "$@"
echo "quickstart: done. Metrics: out/quickstart_metrics.jsonl (plot: scripts/plot_metrics.py out/quickstart_metrics.jsonl)"
