#!/usr/bin/env bash
# CI's reliability extras (docs/reliability.md), one script:
#   1. a clang build with AddressSanitizer + UndefinedBehaviorSanitizer (ULYSSES_SANITIZE=ON) of
#      the CPU test suite and the libFuzzer targets (ULYSSES_FUZZ=ON), in one build tree;
#   2. the whole CPU test suite under the sanitizers (ctest; the CUDA tests and the Python
#      comparison with transformers, label hf, are left out);
#   3. each fuzz target (config loader, token shard reader, checkpoint reader, Hugging Face
#      checkpoint reader) for
#      FUZZ_SECONDS seconds from seeds made here from real files, reporting executions.
# Usage: scripts/ci-extra.sh [BUILD_DIR]   (default /tmp/ulysses-sanitize)
# Environment: FUZZ_SECONDS (default 60), JOBS (default 2), SKIP_TESTS=1, SKIP_FUZZ=1.
# LeakSanitizer is off: Open MPI's plugins, unloaded at MPI_Finalize, leave allocations whose
# stacks cannot be symbolised ("<unknown module>"), so no suppression file can single them out.
# ASan (overflows, use after free) and UBSan stay on and fail the run at the first report.
# Installs clang-14, its runtime (libFuzzer, sanitizers) and libomp from Debian when missing.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-/tmp/ulysses-sanitize}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
JOBS=${JOBS:-2}
t_start=$(date +%s)
stamp() { echo "[ci-extra $(( $(date +%s) - t_start )) s] $*"; }

if ! command -v clang++-14 >/dev/null || [ ! -e /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ] \
   || [ ! -e /usr/lib/llvm-14/lib/libomp.so ]; then
  stamp "installing clang-14, libclang-rt-14-dev, libomp-14-dev"
  apt-get update -qq && apt-get install -y -qq clang-14 libclang-rt-14-dev libomp-14-dev
fi

stamp "configure + build (clang-14, ASan + UBSan, libFuzzer) in $BUILD"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DULYSSES_CUDA=OFF \
      -DULYSSES_SANITIZE=ON -DULYSSES_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS="-fno-sanitize-recover=undefined" -DCMAKE_C_FLAGS="-fno-sanitize-recover=undefined" > "$BUILD.configure.log" \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j"$JOBS" > "$BUILD.build.log" 2>&1 || { tail -50 "$BUILD.build.log"; exit 1; }
stamp "build done"

export ASAN_OPTIONS="abort_on_error=1:detect_leaks=0:strict_string_checks=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
status=0

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "CPU test suite under ASan + UBSan"
  ctest --test-dir "$BUILD" -LE "cuda|hf" --output-on-failure --timeout 900 || status=1
  stamp "tests done (status $status)"
fi

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  F="$BUILD/fuzz-work"
  rm -rf "$F" && mkdir -p "$F"/{config,shard,checkpoint,hf,artifacts,seedgen}
  # seeds: every config in the repository; shards from `ulysses prepare`; checkpoints of the
  # fuzz target's model (fuzz/fuzz_checkpoint.cpp) packed as model|optimizer|state|manifest
  cp "$SRC"/configs/*.yaml "$SRC"/configs/paper/*.yaml "$F/config/"
  U="$BUILD/apps/ulysses"
  head -c 20000 "$SRC/docs/configs.md" > "$F/seedgen/text.txt"
  "$U" prepare "$F/seedgen/text.txt" --out "$F/seedgen/shards" --shard-tokens 3000 --log-level warn
  cp "$F"/seedgen/shards/*.bin "$F/shard/"
  for steps in 1 2; do
    "$U" train --log-level warn --set model.n_layer=1 --set model.n_embd=16 --set model.n_head=2 \
        --set model.max_seq_len=32 --set train.seq_len=32 --set train.micro_batch_size=1 --set train.max_steps=$steps \
        --set runtime.threads=1 --set checkpoint.dir="$F/seedgen/ckpt$steps"
    c="$F/seedgen/ckpt$steps/$(printf 'step_%08d' $steps)"
    { cat "$c/model.bin"; printf '\n@@FILE@@\n'; cat "$c/optimizer.bin"; printf '\n@@FILE@@\n'; cat "$c/state.yaml";
      printf '\n@@FILE@@\n'; cat "$c/manifest.yaml"; } > "$F/checkpoint/seed$steps"
  done
  # Hugging Face exports of the same model (fuzz/fuzz_hf.cpp): config.json|model.safetensors, and
  # the bare model.safetensors
  "$U" train --log-level warn --set model.n_layer=1 --set model.n_embd=16 --set model.n_head=2 \
      --set model.max_seq_len=32 --set train.seq_len=32 --set train.micro_batch_size=1 --set train.max_steps=1 \
      --set runtime.threads=1 --set checkpoint.export_hf="$F/seedgen/hf"
  { cat "$F/seedgen/hf/config.json"; printf '\n@@FILE@@\n'; cat "$F/seedgen/hf/model.safetensors"; } > "$F/hf/seed1"
  cp "$F/seedgen/hf/model.safetensors" "$F/hf/seed2"
  for target in config shard checkpoint hf; do
    stamp "fuzz_$target for $FUZZ_SECONDS s"
    if "$BUILD/fuzz/fuzz_$target" "$F/$target" -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 -rss_limit_mb=4096 \
        -timeout=25 -artifact_prefix="$F/artifacts/${target}-" > "$F/$target.log" 2>&1; then
      execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$F/$target.log")
      stamp "fuzz_$target: $execs executions in $FUZZ_SECONDS s, no finding (corpus $(ls "$F/$target" | wc -l) inputs)"
    else
      status=1
      tail -60 "$F/$target.log"
      stamp "fuzz_$target: FINDING (artifact in $F/artifacts)"
    fi
  done
fi
stamp "done, status $status"
exit $status
