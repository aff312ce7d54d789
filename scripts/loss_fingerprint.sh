#!/usr/bin/env bash
# Loss fingerprint of a build: short CPU training runs whose per-step losses, gradient norms,
# validation losses and sample must be bitwise the same before and after a change that should
# not change the maths (a refactor, a move of code). Runs 8 cases: 1 rank (with sampling,
# selective recompute + MLP tiling, full recompute + RoPE + GQA), mpirun -np 4 with SP 2 (ZeRO 0,
# and ZeRO 3 + RoPE + GQA + full recompute), -np 2 with SP 2 + ZeRO 1 + chunked all-to-alls, and
# a 10-step run resumed to 20. The data: the license texts of /usr/share/common-licenses,
# tokenised byte-level.
#
#   scripts/loss_fingerprint.sh BUILD_A/apps/ulysses OUT_A
#   scripts/loss_fingerprint.sh BUILD_B/apps/ulysses OUT_B
#   scripts/loss_fingerprint.sh --compare OUT_A OUT_B      # exit 0 when every record is equal
set -euo pipefail

if [[ "${1:-}" == "--compare" ]]; then
  a=$2 b=$3 status=0 records=0
  for f in "$a"/*.losses "$a"/*.evals; do
    name=$(basename "$f")
    if ! diff -q <(sed "s#$a#OUT#g" "$f") <(sed "s#$b#OUT#g" "$b/$name") > /dev/null; then
      echo "DIFFERENT: $name"; diff <(sed "s#$a#OUT#g" "$f") <(sed "s#$b#OUT#g" "$b/$name") | head -6; status=1
    fi
  done
  records=$(cat "$a"/*.losses | wc -l)
  [[ $status == 0 ]] && echo "IDENTICAL: $(ls "$a"/*.losses | wc -l) runs, $records step records (losses, norms, val losses, sample)"
  exit $status
fi

BIN=$(realpath "$1") OUT=$(realpath -m "$2")
mkdir -p "$OUT" && rm -rf "${OUT:?}"/*
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cat /usr/share/common-licenses/* > "$OUT/text.txt" 2>/dev/null
"$BIN" prepare "$OUT/text.txt" --out "$OUT/data" --name lic --val-fraction 0.1 > /dev/null
D="$OUT/data"
COMMON=(--set "data.train=$D/lic_train_000000.bin" --set "data.val=$D/lic_val_000000.bin" --set data.shuffle=true
        --set train.eval_interval=10 --set logging.interval=1 --set runtime.device=cpu)
run() {  # run NAME STEPS LAUNCHER... -- ARGS...
  local name=$1 steps=$2; shift 2
  echo "== $name"
  "$@" "${COMMON[@]}" --set train.max_steps="$steps" --set logging.metrics_file="$OUT/$name.jsonl" \
    > "$OUT/$name.log" 2>&1 || { echo "FAILED: $name"; tail -5 "$OUT/$name.log"; exit 1; }
}
MPI=(mpirun --oversubscribe)
run r1 20 "$BIN" train --set train.sample_tokens=48
run r1_selective 20 "$BIN" train --set runtime.recompute=selective --set runtime.tile_tokens=64
run r1_full_rope 20 "$BIN" train --set runtime.recompute=full --set model.position_embedding=rope --set model.n_kv_head=2
run r4_sp2 20 "${MPI[@]}" -np 4 "$BIN" train --set parallel.sequence=2 --set runtime.threads=1
run r4_sp2_z3 20 "${MPI[@]}" -np 4 "$BIN" train --set parallel.sequence=2 --set parallel.zero_stage=3 \
  --set runtime.threads=1 --set model.position_embedding=rope --set model.n_kv_head=2 --set runtime.recompute=full
run r2_sp2_z1_chunks 20 "${MPI[@]}" -np 2 "$BIN" train --set parallel.sequence=2 --set parallel.zero_stage=1 \
  --set runtime.threads=1 --set runtime.all_to_all_chunks=2
run r1_ck10 10 "$BIN" train --set checkpoint.dir="$OUT/ck" --set checkpoint.interval=10
run r1_resume 20 "$BIN" train --set checkpoint.dir="$OUT/ck" --set checkpoint.interval=10 --set checkpoint.resume=auto

# what must not change: every metrics field but the timings, and the log's validation lines and
# sample (timings and times of day stripped)
for f in "$OUT"/*.jsonl; do
  python3 - "$f" > "${f%.jsonl}.losses" <<'PY'
import json, sys
skip = {"step_ms", "tokens_per_second", "tflops_per_rank", "peak_memory_gib"}
for line in open(sys.argv[1]):
    print({k: v for k, v in json.loads(line).items() if k not in skip})
PY
  grep -a -h -A3 "val\|sample" "${f%.jsonl}.log" | sed -e "s/^\[[^]]*\]//" -e "s/| [0-9.]* ms.*//" > "${f%.jsonl}.evals" || true
done
echo "fingerprint of $BIN in $OUT: $(cat "$OUT"/*.losses | wc -l) step records"
