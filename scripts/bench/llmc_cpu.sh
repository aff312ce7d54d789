#!/usr/bin/env bash
# llm.c's CPU trainer (train_gpt2.c) against `ulysses bench`, GPT-2 124M, B = 4, T = 64, run
# alternately on the same machine (issue 17: ">= 5x llm.c's CPU trainer on the same machine").
#
#   scripts/bench/llmc_cpu.sh LLMC_DIR [--pairs 3] [--threads 2] [--work DIR] [--text FILE]...
#
# LLMC_DIR: your own checkout of https://github.com/karpathy/llm.c (this script contains none of
# its code). The script
#   1. builds LLMC_DIR/train_gpt2.c into WORK/train_gpt2 as llm.c's Makefile does for the CPU
#      with OpenMP (cc -O3 -Ofast -march=native -fopenmp -DOMP ... -lm -lgomp; retried with
#      -fgnu89-inline for llm.c versions whose llmc/utils.h has plain C99 `inline` helpers);
#   2. makes llm.c's inputs with ulysses, in WORK (never in LLMC_DIR): byte-level token shards of
#      the text files (`ulysses prepare`; default /usr/share/common-licenses/*), placed where
#      train_gpt2.c looks (dev/data/tinyshakespeare/tiny_shakespeare_{train,val}.bin), and a
#      freshly initialised GPT-2 124M exported in llm.c's format as WORK/gpt2_124M.bin
#      (`checkpoint.export_llmc` after 0 steps). Token ids < 256 < 50257: fine for timing;
#   3. runs, --pairs times, llm.c then ulysses: llm.c (B = 4, T = 64 are its main()'s defaults)
#      until it has printed steps 0..3, then stopped (its step 0 allocates the gradients and is a
#      warm-up; its time is the median of steps 1..3), and
#        ulysses bench --config configs/gpt2-124m.yaml --set train.seq_len=64
#          --set train.micro_batch_size=4 --set runtime.threads=T --warmup 1 --repeat 3
#      (median of 3 steps after 1 warm-up), and prints one table row per run with the load
#      average at its start and each pair's ratio, the medians over the pairs, the ratio of the
#      medians and the median of the pairs' ratios.
# Both use OMP_NUM_THREADS = --threads. The machine should be otherwise idle; if it is not, only
# the ratio of the interleaved runs means anything (say the load when you quote it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
ulysses="${ULYSSES:-$root/build-cpu/apps/ulysses}"
[[ -x "$ulysses" ]] || ulysses="$root/build/apps/ulysses"

llmc=""; pairs=3; threads=2; work=""; texts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --pairs) pairs="$2"; shift 2;;
    --threads) threads="$2"; shift 2;;
    --work) work="$2"; shift 2;;
    --text) texts+=("$2"); shift 2;;
    -h|--help) sed -n '2,26p' "$0"; exit 0;;
    -*) echo "error: unknown option '$1' (see the header of $0)" >&2; exit 2;;
    *) llmc="$1"; shift;;
  esac
done
[[ -n "$llmc" && -f "$llmc/train_gpt2.c" ]] || {
  echo "error: give the path of an llm.c checkout (with train_gpt2.c) as the argument" >&2; exit 2; }
[[ -x "$ulysses" ]] || { echo "error: no ulysses executable (set ULYSSES=...)" >&2; exit 2; }
llmc="$(cd "$llmc" && pwd)"
work="${work:-$(mktemp -d /tmp/llmc-bench.XXXXXX)}"
mkdir -p "$work/dev/data/tinyshakespeare" "$work/data"
work="$(cd "$work" && pwd)"
[[ ${#texts[@]} -gt 0 ]] || texts=(/usr/share/common-licenses/*)

# 1. build llm.c's CPU trainer
cflags=(-O3 -Ofast -Wno-unused-result -Wno-ignored-pragmas -Wno-unknown-attributes -march=native
        -fopenmp -DOMP -I"$llmc")
cc_="${CC:-cc}"
if ! "$cc_" "${cflags[@]}" "$llmc/train_gpt2.c" -lm -lgomp -o "$work/train_gpt2" 2>"$work/build.log"; then
  "$cc_" "${cflags[@]}" -fgnu89-inline "$llmc/train_gpt2.c" -lm -lgomp -o "$work/train_gpt2" \
    2>>"$work/build.log" || { cat "$work/build.log" >&2; exit 1; }
fi
echo "built $work/train_gpt2 ($cc_ ${cflags[*]})"

# 2. llm.c's inputs, made by ulysses
if [[ ! -f "$work/gpt2_124M.bin" ]]; then
  "$ulysses" prepare "${texts[@]}" --out "$work/data" --name text --tokenizer byte --log-level warn
  cp "$work/data/text_train_000000.bin" "$work/dev/data/tinyshakespeare/tiny_shakespeare_train.bin"
  cp "$work/data/text_val_000000.bin" "$work/dev/data/tinyshakespeare/tiny_shakespeare_val.bin"
  "$ulysses" train --config "$root/configs/gpt2-124m.yaml" --log-level warn \
    --set train.max_steps=0 --set train.seq_len=64 --set train.micro_batch_size=1 \
    --set train.global_batch_tokens=0 --set train.eval_steps=0 --set train.sample_tokens=0 \
    --set "data.train=[\"$work/data/text_train_*.bin\"]" \
    --set "data.val=[\"$work/data/text_val_*.bin\"]" --set data.tokenizer=byte \
    --set checkpoint.dir="$work/ckpt" --set checkpoint.export_llmc="$work/gpt2_124M.bin" \
    --set logging.metrics_file= --set runtime.threads="$threads" 2>&1 | grep -v warning || true
  [[ -f "$work/gpt2_124M.bin" ]] || { echo "error: the llm.c checkpoint was not written" >&2; exit 1; }
fi

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

# llm.c: run until "step 3:" is printed, stop it, print the median of steps 1..3 in ms.
run_llmc() {
  local log="$work/llmc_$1.log"
  (cd "$work" && OMP_NUM_THREADS="$threads" exec stdbuf -oL ./train_gpt2 >"$log" 2>&1) &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && ! grep -q '^step 3:' "$log"; do sleep 1; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  grep -q '^step 3:' "$log" || { echo "error: llm.c stopped early, see $log" >&2; exit 1; }
  grep -E '^step [123]:' "$log" | sed -E 's/.*took ([0-9.]+) ms.*/\1/' | median
}

# ulysses: the bench's median step in ms.
run_ulysses() {
  local log="$work/ulysses_$1.log"
  OMP_NUM_THREADS="$threads" "$ulysses" bench --config "$root/configs/gpt2-124m.yaml" \
    --set train.seq_len=64 --set train.micro_batch_size=4 --set runtime.threads="$threads" \
    --warmup 1 --repeat 3 >"$log" 2>&1
  grep -E '\] +step ' "$log" | sed -E 's/.*step +([0-9.]+) ms.*/\1/'
}

loadavg() { cut -d' ' -f1 /proc/loadavg; }

printf '\n%-5s %-8s %-10s %14s %8s\n' pair program load step_ms ratio
llmc_ms=(); uly_ms=(); ratios=()
for ((p = 1; p <= pairs; p++)); do
  l=$(loadavg); t=$(run_llmc "$p"); llmc_ms+=("$t")
  printf '%-5s %-8s %-10s %14.1f\n' "$p" llm.c "$l" "$t"
  l=$(loadavg); u=$(run_ulysses "$p"); uly_ms+=("$u")
  r=$(awk -v a="$t" -v b="$u" 'BEGIN {print a / b}'); ratios+=("$r")
  printf '%-5s %-8s %-10s %14.1f %7.2fx\n' "$p" ulysses "$l" "$u" "$r"
done
ml=$(printf '%s\n' "${llmc_ms[@]}" | median)
mu=$(printf '%s\n' "${uly_ms[@]}" | median)
mr=$(printf '%s\n' "${ratios[@]}" | median)
printf '\nmedian over %d pairs: llm.c %.1f ms, ulysses %.1f ms (ratio of the medians %.2fx); median of\n' \
  "$pairs" "$ml" "$mu" "$(awk -v a="$ml" -v b="$mu" 'BEGIN {print a / b}')"
printf 'the pairs'"'"' ratios %.2fx (%d threads). If the load column moves, trust neither.\n' "$mr" "$threads"
echo "logs in $work"
