#!/usr/bin/env bash
# Sequence-length sweep with `ulysses bench`: one CSV row per (P, N), then the plot.
#
#   scripts/bench/sweep.sh --config configs/tiny.yaml --lengths "1024 2048 4096" --p "8 32" \
#       [--emulate | --np-per-p] [--out out/sweep] [--repeat 3] [--set key=value]...
#
# --emulate (default): each P runs on ONE process with parallel.emulate_sequence = P (one rank's
#                      work of a P-rank run; the all-to-alls are local copies of the same size)
# --np-per-p:          real runs, `mpirun -np P` with parallel.sequence = P (needs P processes)
# N must be a multiple of P; the learned position table is resized to N (model.max_seq_len = N).
# Writes <out>/bench.csv and <out>/sweep.png (scripts/bench/plot_sweep.py), and runs the scaling
# model (scripts/scaling_model.py) for NVLink and InfiniBand into <out>/scaling_*.csv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
ulysses="${ULYSSES:-$root/build/apps/ulysses}"
config=""; lengths="1024 2048 4096"; plist="8"; mode=emulate; out="out/sweep"; repeat=3; sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2;;
    --lengths) lengths="$2"; shift 2;;
    --p) plist="$2"; shift 2;;
    --emulate) mode=emulate; shift;;
    --np-per-p) mode=real; shift;;
    --out) out="$2"; shift 2;;
    --repeat) repeat="$2"; shift 2;;
    --set) sets+=(--set "$2"); shift 2;;
    *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2;;
  esac
done
[[ -x "$ulysses" ]] || { echo "error: $ulysses not found: build first or set ULYSSES=path" >&2; exit 2; }
mkdir -p "$out"
csv="$out/bench.csv"; rm -f "$csv"
cfg=(); [[ -n "$config" ]] && cfg=(--config "$config")
mpirun_cmd=(mpirun)
[[ "$(id -u)" == 0 ]] && mpirun_cmd+=(--allow-run-as-root)
for P in $plist; do
  for N in $lengths; do
    if (( N % P != 0 )); then echo "skip N=$N P=$P (N not a multiple of P)"; continue; fi
    common=("${cfg[@]}" --set train.seq_len="$N" --set model.max_seq_len="$N" "${sets[@]}" --repeat "$repeat" --warmup 1 --csv "$csv")
    echo "== P=$P N=$N ($mode)"
    if [[ "$mode" == emulate ]]; then
      "$ulysses" bench "${common[@]}" --set parallel.emulate_sequence="$P" --set parallel.sequence=1
    else
      "${mpirun_cmd[@]}" --oversubscribe -np "$P" "$ulysses" bench "${common[@]}" --set parallel.sequence="$P"
    fi
  done
done
python3 "$here/plot_sweep.py" "$csv" --out "$out/sweep.png" || echo "(plot skipped: matplotlib missing?)"
python3 "$root/scripts/scaling_model.py" "$csv" --link nvlink --out "$out/scaling_nvlink.csv"
python3 "$root/scripts/scaling_model.py" "$csv" --link ib --out "$out/scaling_ib.csv"
