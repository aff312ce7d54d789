#!/usr/bin/env bash
# Fault tests against the real `ulysses` executable (CTest runs one case per entry):
#   faults.sh CASE ULYSSES MPIRUN WORKDIR
# CASE is one of:
#   sigterm_resume    2 ranks; SIGTERM to rank 1 only mid-run: both ranks stop after the same
#                     step, write a checkpoint, exit 0 and say how to resume; resuming gives the
#                     uninterrupted run's losses bit for bit (metrics "loss" values as text)
#   sigint_twice      Ctrl-C twice: the second SIGINT ends the process at once with code 130
#   kill_during_save  kill -9 while checkpoint 4 is being written: checkpoint 2 stays valid, the
#                     half-written one is never picked, resume auto continues bit for bit
#   rank_killed       4 ranks; kill -9 of rank 2 mid-run: the job exits non-zero within
#                     runtime.comm_timeout + 5 s
#   rank_hung         4 ranks; SIGSTOP of rank 2 mid-run: the watchdogs of the others report the
#                     collective, group, step and rank and abort the job within the timeout + 10 s
# Each case prints what it measured (seconds to exit) and fails with a message saying why.
set -u
CASE=$1 ULYSSES=$2 MPIRUN=$3 WORK=$4
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK" || exit 1

# never leave a run behind: a stopped rank or a long mpirun job is killed when the script ends
job="" victim=""
cleanup() { for p in $victim $job; do kill -KILL "$p" 2>/dev/null; done; }
trap cleanup EXIT
fail() { echo "FAIL $CASE: $*"; for f in *.out; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# A 2-layer, 32-wide model on synthetic tokens: a few ms per step.
TINY=(--set model.n_layer=2 --set model.n_embd=32 --set model.n_head=4 --set model.max_seq_len=64
      --set train.seq_len=32 --set train.micro_batch_size=2 --set train.warmup_steps=2
      --set data.source=synthetic --set runtime.threads=1)
# A 4-layer, 256-wide model (3.2M parameters, 38 MB per checkpoint): saves take a while.
WIDE=(--set model.n_layer=4 --set model.n_embd=256 --set model.n_head=4 --set model.max_seq_len=256
      --set data.source=synthetic --set runtime.threads=1)
MPI=("$MPIRUN" --oversubscribe)

lines() { [ -f "$1" ] && wc -l < "$1" || echo 0; }
# wait_lines FILE N PID: until FILE has N lines (fails if PID ends first or after 120 s)
wait_lines() {
  local t0; t0=$(now)
  while [ "$(lines "$1")" -lt "$2" ]; do
    kill -0 "$3" 2>/dev/null || fail "the run ended before $1 had $2 lines"
    [ "$(elapsed "$t0" | cut -d. -f1)" -lt 120 ] || fail "no progress in $1"
    sleep 0.05
  done
}
# rank_pid MPIRUN_PID RANK: the pid of a rank started by this mpirun
rank_pid() {
  local p
  for p in $(pgrep -P "$1"); do
    tr '\0' '\n' < /proc/"$p"/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2" && { echo "$p"; return; }
  done
}
losses() { sed -n 's/.*"loss": \([^,]*\),.*/\1/p' "$1"; }

case "$CASE" in
sigterm_resume)
  "${MPI[@]}" -np 2 "$ULYSSES" train "${TINY[@]}" --set train.max_steps=120 \
      --set logging.metrics_file=full.jsonl > full.out 2>&1 || fail "uninterrupted run failed"
  "${MPI[@]}" -np 2 "$ULYSSES" train "${TINY[@]}" --set train.max_steps=120 --set checkpoint.dir=ckpt \
      --set logging.metrics_file=cut.jsonl > cut.out 2>&1 &
  job=$!
  wait_lines cut.jsonl 10 $job
  victim=$(rank_pid $job 1)
  [ -n "$victim" ] || fail "cannot find rank 1 of mpirun $job"
  t0=$(now); kill -TERM "$victim"
  wait $job; rc=$?; took=$(elapsed "$t0")
  [ $rc -eq 0 ] || fail "exit code $rc after SIGTERM, expected 0"
  step=$(sed -n 's/.*SIGTERM: stopped after step \([0-9]*\) of 120.*/\1/p' cut.out)
  [ -n "$step" ] || fail "no 'SIGTERM: stopped after step N' message"
  grep -q -- "--set checkpoint.resume=auto" cut.out || fail "the message does not say how to resume"
  [ "$(lines cut.jsonl)" -eq "$step" ] || fail "metrics has $(lines cut.jsonl) lines, stopped after $step"
  [ -f "ckpt/$(printf 'step_%08d' "$step")/manifest.yaml" ] || fail "no checkpoint of step $step"
  "${MPI[@]}" -np 2 "$ULYSSES" train "${TINY[@]}" --set train.max_steps=120 --set checkpoint.dir=ckpt \
      --set checkpoint.resume=auto --set logging.metrics_file=cut.jsonl > resume.out 2>&1 || fail "resume failed"
  grep -q "resumed from ckpt/step_$(printf '%08d' "$step") at step $step" resume.out || fail "did not resume from step $step"
  losses full.jsonl > a.txt; losses cut.jsonl > b.txt
  [ "$(wc -l < a.txt)" -eq 120 ] || fail "uninterrupted run wrote $(wc -l < a.txt) losses"
  cmp -s a.txt b.txt || { diff a.txt b.txt | head; fail "stopped + resumed losses differ from the uninterrupted run"; }
  echo "ok: SIGTERM to rank 1 -> stopped after step $step, checkpoint written, exit 0 in ${took} s;" \
       "resumed run's 120 losses equal the uninterrupted run's bit for bit"
  ;;
sigint_twice)
  "$ULYSSES" train "${WIDE[@]}" --set train.seq_len=256 --set train.micro_batch_size=4 --set train.max_steps=1000 \
      --set checkpoint.dir=ckpt --set logging.metrics_file=m.jsonl > run.out 2>&1 &
  job=$!
  wait_lines m.jsonl 1 $job
  t0=$(now); kill -INT $job; sleep 0.2; kill -INT $job
  wait $job; rc=$?; took=$(elapsed "$t0")
  [ $rc -eq 130 ] || fail "exit code $rc after two SIGINTs, expected 130"
  grep -q "second interrupt: exiting now" run.out || fail "no 'second interrupt' message"
  echo "ok: two SIGINTs -> exit 130 after ${took} s"
  ;;
kill_during_save)
  ARGS=("${WIDE[@]}" --set train.seq_len=64 --set train.micro_batch_size=2 --set train.max_steps=6
        --set checkpoint.interval=2 --set checkpoint.keep_last=10)
  "$ULYSSES" train "${ARGS[@]}" --set checkpoint.dir=full_ckpt --set logging.metrics_file=full.jsonl > full.out 2>&1 \
      || fail "uninterrupted run failed"
  caught=0
  for attempt in 1 2 3; do
    rm -rf ckpt
    "$ULYSSES" train "${ARGS[@]}" --set checkpoint.dir=ckpt > cut.out 2>&1 &
    job=$!
    # spin until the save of step 4 has begun (its temporary directory exists), then kill -9
    while [ ! -d ckpt/.tmp-step_00000004 ] && kill -0 $job 2>/dev/null; do :; done
    kill -KILL $job 2>/dev/null; wait $job 2>/dev/null
    if [ -d ckpt/.tmp-step_00000004 ] && [ ! -d ckpt/step_00000004 ]; then caught=1; break; fi
    echo "attempt $attempt: the save finished before the kill; again"
  done
  [ $caught -eq 1 ] || fail "could not kill the trainer during a save in 3 attempts"
  written=$(du -sb ckpt/.tmp-step_00000004 | cut -f1)
  [ -f ckpt/step_00000002/manifest.yaml ] || fail "checkpoint 2 is gone"
  t0=$(now)
  "$ULYSSES" train "${ARGS[@]}" --set checkpoint.dir=ckpt --set checkpoint.resume=auto \
      --set logging.metrics_file=resumed.jsonl > resume.out 2>&1 || fail "resume failed"
  grep -q "resumed from ckpt/step_00000002 at step 2" resume.out || fail "did not resume from checkpoint 2"
  losses full.jsonl | tail -n 4 > a.txt; losses resumed.jsonl > b.txt
  [ "$(wc -l < b.txt)" -eq 4 ] || fail "the resumed run wrote $(wc -l < b.txt) losses, expected 4"
  cmp -s a.txt b.txt || { paste a.txt b.txt; fail "resumed losses differ from the uninterrupted run"; }
  cmp -s full_ckpt/step_00000006/model.bin ckpt/step_00000006/model.bin || fail "final weights differ"
  echo "ok: kill -9 with $written bytes of checkpoint 4 written: checkpoint 2 intact, resume auto picked it;" \
       "steps 3-6 and the final weights equal the uninterrupted run's bit for bit"
  ;;
rank_killed|rank_hung)
  timeout_s=$([ "$CASE" = rank_killed ] && echo 10 || echo 3)
  "${MPI[@]}" -np 4 "$ULYSSES" train "${TINY[@]}" --set parallel.sequence=2 --set train.max_steps=100000 \
      --set runtime.comm_timeout=$timeout_s --set logging.metrics_file=m.jsonl > run.out 2>&1 &
  job=$!
  wait_lines m.jsonl 3 $job
  victim=$(rank_pid $job 2)
  [ -n "$victim" ] || fail "cannot find rank 2 of mpirun $job"
  t0=$(now)
  if [ "$CASE" = rank_killed ]; then kill -KILL "$victim"; else kill -STOP "$victim"; fi
  grace=$([ "$CASE" = rank_killed ] && echo 5 || echo 10)
  limit=$((timeout_s + grace))
  # wait for mpirun, at most limit + 30 s (then the test has failed anyway)
  while kill -0 $job 2>/dev/null && [ "$(elapsed "$t0" | cut -d. -f1)" -lt $((limit + 30)) ]; do sleep 0.1; done
  took=$(elapsed "$t0")
  if kill -0 $job 2>/dev/null; then kill -KILL "$victim" $job 2>/dev/null; wait $job; fail "still running after ${took} s"; fi
  wait $job; rc=$?
  kill -KILL "$victim" 2>/dev/null
  [ $rc -ne 0 ] || fail "mpirun exited 0"
  awk -v t="$took" -v l="$limit" 'BEGIN { exit !(t <= l) }' || fail "took ${took} s, limit ${limit} s"
  if [ "$CASE" = rank_hung ]; then
    grep -Eq "watchdog: rank [013]: [a-z_]+ on group '[a-z]+\[?[0-9]*\]?' at step [0-9]+ has not finished after" run.out \
      || fail "no watchdog message naming the collective, group, step and rank"
    echo "ok: rank 2 stopped -> $(grep -o "watchdog: rank [0-9]*: [a-z_]* on group '[^']*' at step [0-9]*" run.out | head -1)" \
         "-> mpirun exit code $rc after ${took} s (comm_timeout ${timeout_s} s)"
  else
    echo "ok: rank 2 killed -> mpirun exit code $rc after ${took} s (comm_timeout ${timeout_s} s)"
  fi
  ;;
*) fail "unknown case" ;;
esac
