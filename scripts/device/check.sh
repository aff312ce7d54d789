#!/usr/bin/env bash
# GPU check of the CUDA path. Two parts, each within about 6 minutes, so a 15-minute device lease
# can run both (CHECK_ONLY=tests, then CHECK_ONLY=bench) or all at once:
#   tests  every CUDA op against the CPU reference (test_cuda_ops, test_cuda_dispatch), cuDNN SDPA,
#          the model on cuda against cpu (test_cuda_model), the trainer (test_cuda_train: cuda vs
#          cpu, determinism, NCCL, resume; SP = 4 on 4 ranks sharing the GPU through staged MPI),
#          `ulysses check` of every collective on device memory, a `ulysses train` smoke run;
#   bench  the kernel benchmark, and the training step of ulysses beside the same step in PyTorch
#          (scripts/bench/torch_gpt.py, torch_attention.py) on the issue's shapes.
# Prints a summary last: GPU, driver, each stage PASS / FAIL / SKIP / TIMEOUT, the measured
# ceilings, and two tables (training step, attention) with ulysses and PyTorch side by side.
#
# Usage, from the repository root on the GPU machine:
#   scripts/device/check.sh [BUILD_DIR] [RUNTIME_BUNDLE]
#     BUILD_DIR       a CUDA build made on the Debian machine (default: build-gpu), e.g.
#                       cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90
#                       cmake --build build-gpu -j2 --target ulysses test_cuda_ops ...
#                     or simply scripts/device/prepare.sh (builds all and packs the carried folder)
#     RUNTIME_BUNDLE  runtime.tar.xz from ../shared/gpu/make-runtime-bundle.sh (Open MPI, BLAS,
#                     yaml-cpp, spdlog for machines without Debian's libraries); optional, also
#                     looked for as ./runtime.tar.xz. Made with
#                       ../shared/gpu/make-runtime-bundle.sh runtime.tar.xz build-gpu/apps/ulysses \
#                         build-gpu/tests/cuda/test_cuda_ops build-gpu/tests/cuda/bench_cuda
# The PyTorch stages use the machine's own python3 (with CUDA PyTorch), under the library path the
# machine had before the bundle's env.sh.
# Environment:
#   CHECK_ONLY=tests|bench only that part (default: both)
#   CHECK_QUICK=1          the benchmarks' quick modes (attention up to 16K only)
#   CHECK_BUDGET_S=470     seconds for the whole script: each stage's timeout is its own cap or what
#                          is left of the budget, whichever is less; a stage with under 20 s left is
#                          skipped ("SKIP (no time)")
#   CHECK_TORCH_COMPILE=1  also time GPT-2 124M under torch.compile (about a minute of compiling)
# Exit status: 0 when the CUDA tests and bench_cuda passed (or were skipped for want of a GPU), 1
# otherwise. The training-step and PyTorch stages are reported but do not fail the script; a
# failing stage never stops it.
#
# To add a test: one `stage test_NAME CAP_S COMMAND...` line in the tests section and its name in
# required_stages; its verdict and its FAIL lines appear in the summary.
set -uo pipefail
build=${1:-build-gpu}
bundle=${2:-runtime.tar.xz}
log_dir=$(mktemp -d)
budget_s=${CHECK_BUDGET_S:-470}
quick=${CHECK_QUICK:-0}
started=$SECONDS
ulysses_bin=$build/apps/ulysses
python_env=(env "LD_LIBRARY_PATH=${LD_LIBRARY_PATH-}")  # the library path before env.sh
only=${CHECK_ONLY:-all}
# mpirun as root in a container; 4 ranks on a 16-core box share the one GPU
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# no cross-process memory reads (CMA) in Open MPI's shared-memory transport: sandboxed machines
# (gVisor) refuse them; the copy-in / copy-out path costs nothing that matters here
export OMPI_MCA_btl_vader_single_copy_mechanism=none
mpirun_cmd=(mpirun --oversubscribe)
# the tiny config with 64-wide heads (the CUDA flash attention's head sizes are 64 and 128)
smoke=(--set model.n_head=2 --set runtime.device=cuda --set logging.interval=10)

if [ -f "$bundle" ]; then
  mkdir -p /tmp/ulysses-rt && tar -xJf "$bundle" -C /tmp/ulysses-rt && source /tmp/ulysses-rt/env.sh
fi
for b in "$build/tests/cuda/test_cuda_ops" "$build/tests/cuda/bench_cuda" "$ulysses_bin"; do
  [ -x "$b" ] || { echo "check.sh: $b not found (build it first, see the top of this script)" >&2; continue; }
  if ldd "$b" | grep -q "not found"; then
    echo "check.sh: unresolved libraries for $b:" >&2; ldd "$b" | grep "not found" >&2
  fi
done
# one rank of ulysses: through the (bundled) mpirun when there is one
launch=()
command -v mpirun >/dev/null && launch=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 1 --oversubscribe)

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)

verdict() {  # verdict EXIT_CODE STAGE -> PASS / SKIP / TIMEOUT / FAIL (torch_gpt.py exits 3 when out of memory)
  case $1 in 0) echo PASS ;; 77) echo SKIP ;; 124|137) echo TIMEOUT ;; skip) echo "SKIP (no time)" ;;
    3) [[ $2 == torch_* ]] && echo "FAIL (out of memory)" || echo "FAIL (exit 3)" ;; *) echo "FAIL (exit $1)" ;; esac
}

# stage NAME CAP_S COMMAND...: runs COMMAND under `timeout`, output to the screen and
# $log_dir/NAME.log, exit code into rc[NAME]; never stops the script.
declare -A rc
stages=()
stage() {
  local name=$1 cap=$2; shift 2
  local left=$((budget_s - (SECONDS - started)))
  local limit=$((cap < left ? cap : left))
  stages+=("$name")
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the ${budget_s} s budget left"
    rc[$name]=skip
    echo skip > "$log_dir/$name.rc"
    return
  fi
  echo "== $name (timeout ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log_dir/$name.log"
  rc[$name]=${PIPESTATUS[0]}
  echo "${rc[$name]}" > "$log_dir/$name.rc"
}

# ---- tests ----------------------------------------------------------------------------------------
required_stages=()
if [ "$only" != bench ]; then
  required_stages+=(test_cuda_ops test_cuda_dispatch test_cudnn_attention test_cuda_model test_cuda_train
                    test_cuda_train_np4 check_nccl_np1 check_staged_np2 train_smoke)
  stage test_cuda_ops 100 "$build/tests/cuda/test_cuda_ops"
  stage test_cuda_dispatch 40 "$build/tests/cuda/test_cuda_dispatch"
  stage test_cudnn_attention 120 "$build/tests/cuda/test_cudnn_attention"
  stage test_cuda_model 50 "$build/tests/cuda/test_cuda_model"
  stage test_cuda_train 120 "$build/tests/cuda/test_cuda_train" "[one_rank]"
  stage test_cuda_train_np4 100 "${mpirun_cmd[@]}" -np 4 "$build/tests/cuda/test_cuda_train" "[four_ranks]"
  stage check_nccl_np1 30 "${launch[@]}" "$ulysses_bin" check --set runtime.device=cuda --set parallel.backend=nccl
  stage check_staged_np2 40 "${mpirun_cmd[@]}" -np 2 "$ulysses_bin" check --set runtime.device=cuda \
    --set parallel.backend=mpi --set parallel.sequence=2
  stage train_smoke 40 "${launch[@]}" "$ulysses_bin" train "${smoke[@]}" --set train.max_steps=30 --set train.sample_tokens=64
fi
[ "$only" = tests ] && budget_s=0  # the bench part below is skipped

# ---- kernel benchmark -----------------------------------------------------------------------------
bench_args=()
[ "$quick" = 1 ] && bench_args=(--quick)
[ "$only" != tests ] && required_stages+=(bench_cuda)
stage bench_cuda 120 "$build/tests/cuda/bench_cuda" "${bench_args[@]}"

# ---- training step: ulysses and PyTorch on the same shapes ----------------------------------------
# ulysses_bench NAME CAP_S CONFIG --set ...: one `ulysses bench` row (CSV in $log_dir/NAME.csv)
ulysses_bench() {
  local name=$1 cap=$2 config=$3; shift 3
  stage "$name" "$cap" "${launch[@]}" "$ulysses_bin" bench --config "$config" --set runtime.device=cuda "$@" \
    --warmup 2 --repeat 5 --csv "$log_dir/$name.csv"
}
torch_gpt() {
  local name=$1 cap=$2; shift 2
  stage "$name" "$cap" "${python_env[@]}" PYTHONUNBUFFERED=1 python3 scripts/bench/torch_gpt.py --warmup 3 --steps 10 "$@"
}
gpt13=configs/paper/gpt-1.3b-256k.yaml
gpt13_set=(--set parallel.sequence=1 --set parallel.backend=auto --set train.micro_batch_size=1 --set runtime.tile_tokens=0)

# GPT-2 124M, N = 1024, B = 16 (configs/gpt2-124m.yaml as it is)
ulysses_bench ulysses_124m_n1k 45 configs/gpt2-124m.yaml --set runtime.recompute=none
torch_gpt torch_124m_n1k 60 --preset gpt2-124m --seq-len 1024 --batch 16
# GPT 1.3B (24 x 2048, 16 heads, RoPE), B = 1, N = 8K: no recompute on either side
ulysses_bench ulysses_1p3b_n8k 60 "$gpt13" "${gpt13_set[@]}" --set train.seq_len=8192 --set model.max_seq_len=8192 \
  --set runtime.recompute=none
torch_gpt torch_1p3b_n8k 60 --preset gpt-1.3b --seq-len 8192 --batch 1
# N = 32K: ulysses with selective recompute (44.8 GiB by `ulysses estimate`); PyTorch without recompute where it fits,
# else with every block checkpointed (--recompute auto; the table says which)
ulysses_bench ulysses_1p3b_n32k 75 "$gpt13" "${gpt13_set[@]}" --set train.seq_len=32768 --set model.max_seq_len=32768 \
  --set runtime.recompute=selective
torch_gpt torch_1p3b_n32k 90 --preset gpt-1.3b --seq-len 32768 --batch 1 --recompute auto --warmup 2 --steps 4
# runtime.all_to_all_chunks (comm/ulysses.h): one emulated rank of P = 8 at N = 32K (4K local
# tokens, 2 of the 16 heads), the all-to-alls whole (K = 1) and pipelined in 4 chunks per
# sequence (K = 4, the device copies on their own stream beside the GEMMs); ~15 s each
ulysses_bench ulysses_1p3b_n32k_p8_k1 20 "$gpt13" "${gpt13_set[@]}" --set train.seq_len=32768 \
  --set model.max_seq_len=32768 --set parallel.emulate_sequence=8 --set runtime.recompute=selective \
  --set runtime.all_to_all_chunks=1
ulysses_bench ulysses_1p3b_n32k_p8_k4 20 "$gpt13" "${gpt13_set[@]}" --set train.seq_len=32768 \
  --set model.max_seq_len=32768 --set parallel.emulate_sequence=8 --set runtime.recompute=selective \
  --set runtime.all_to_all_chunks=4
if [ "${CHECK_TORCH_COMPILE:-0}" = 1 ]; then
  torch_gpt torch_124m_n1k_compile 150 --preset gpt2-124m --seq-len 1024 --batch 16 --compile
fi

# ---- attention: PyTorch SDPA (flash, cuDNN) beside bench_cuda's attention lines --------------------
attn_args=()
[ "$quick" = 1 ] && attn_args=(--quick)
stage torch_attention 60 "${python_env[@]}" PYTHONUNBUFFERED=1 python3 scripts/bench/torch_attention.py "${attn_args[@]}"

# ---- summary --------------------------------------------------------------------------------------
echo
echo "================ ulysses CUDA check ================"
printf "%-26s %s\n" "GPU" "${gpu:-unknown}" "driver" "${driver:-unknown}" "time" "$((SECONDS - started)) s"
for name in "${stages[@]}"; do
  printf "%-26s %s\n" "$name" "$(verdict "${rc[$name]}" "$name")"
  case $name in
    test_*) grep -E "^FAIL" "$log_dir/$name.log" 2>/dev/null | head -20 | sed 's/^/    /' ;;
    bench_cuda)
      grep -E "^ceiling|^attention fwd\+bwd" "$log_dir/$name.log" 2>/dev/null | sed 's/^/    /'
      grep -E "^(matmul_forward bias |layernorm_forward|crossentropy|adamw)" "$log_dir/$name.log" 2>/dev/null | sed 's/^/    /' ;;
  esac
done
echo
# The two tables: ulysses bench CSV rows and the RESULT lines of the PyTorch scripts. MFU uses
# torch_gpt.py's peak table for both (the same table as docs/benchmarks.md).
"${python_env[@]}" GPU_NAME="${gpu:-}" python3 - "$log_dir" <<'PY' || echo "(no tables: python3 failed)"
import csv, json, os, re, sys
log_dir, gpu = sys.argv[1], os.environ.get("GPU_NAME", "")
sys.path.insert(0, "scripts/bench")
peak = None
try:
    import ast
    src = open("scripts/bench/torch_gpt.py").read()  # the table without importing torch
    table = ast.literal_eval(re.search(r"^PEAK_TFLOPS = (\[.*\])$", src, re.M).group(1))
    peak = next((t for key, t in table if key in gpu), None)
except Exception:
    pass

def read(name):
    try:
        return open(os.path.join(log_dir, name + ".log")).read()
    except OSError:
        return ""

def results(name):
    return [json.loads(l[7:]) for l in read(name).splitlines() if l.startswith("RESULT {")]

def failed(name):
    # a stage without numbers: what its exit code says
    try:
        rc = open(os.path.join(log_dir, name + ".rc")).read().strip()
    except OSError:
        return None
    word = {"skip": "skip", "124": "timeout", "137": "timeout", "3": "oom"}.get(rc, "fail")
    return dict(status=word)

def ulysses_row(name):
    try:
        rows = list(csv.DictReader(open(os.path.join(log_dir, name + ".csv"))))
    except OSError:
        rows = []
    if not rows:
        return failed(name)
    r = rows[-1]
    tf = float(r["tflops_per_rank"])
    mem = r.get("peak_gpu_gib") or r.get("peak_memory_gib")
    return dict(tokens=float(r["tokens_per_second"]), tflops=tf, mfu=tf / peak if peak else None,
                step_ms=float(r["step_ms"]), mem=float(mem) if mem else None, recompute=r.get("recompute", "?"))

def torch_row(name):
    res = results(name)
    if not res:
        return failed(name)
    r = res[-1]
    if r.get("status") != "ok":
        return dict(status=r.get("status", "?"))
    rec = r["recompute"] + (" (none OOM)" if r.get("oom_without_recompute") else "")
    return dict(tokens=r["tokens_per_s"], tflops=r["tflops"], mfu=r["mfu"], step_ms=r["step_ms"],
                mem=r["peak_mem_gib"], recompute=rec + (" compiled" if r.get("compile") else ""))

def cell(row, key, fmt):
    if row is None:
        return "FAIL"
    if "status" in row:
        return row["status"].upper()
    v = row.get(key)
    return "-" if v is None else fmt.format(v)

print(f"training step ({gpu or 'unknown GPU'}, MFU against {peak or '?'} TFLOP/s bf16 dense; "
      "FLOPs = core/gpt_params.cpp flops_per_token, causal attention halved)")
hdr = f"{'shape':<22} {'run':<8} {'recompute':<20} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}"
print(hdr)
shapes = [("GPT-2 124M B16 N1K", "124m_n1k"), ("GPT 1.3B B1 N8K", "1p3b_n8k"), ("GPT 1.3B B1 N32K", "1p3b_n32k")]
for label, key in shapes:
    runs = [("ulysses", ulysses_row("ulysses_" + key)), ("torch", torch_row("torch_" + key))]
    if os.path.exists(os.path.join(log_dir, f"torch_{key}_compile.log")):
        runs.append(("torch+c", torch_row(f"torch_{key}_compile")))
    for run, row in runs:
        rec = "" if row is None or "status" in row else row["recompute"]
        print(f"{label:<22} {run:<8} {rec:<20} {cell(row, 'step_ms', '{:.1f}'):>9} {cell(row, 'tokens', '{:,.0f}'):>11} "
              f"{cell(row, 'tflops', '{:.1f}'):>8} {cell(row, 'mfu', '{:.1%}'):>6} {cell(row, 'mem', '{:.1f}'):>8}")
        label = ""
# the all-to-all pipeline pair: one emulated rank of P = 8 (its own tokens/s, N/8 tokens per step)
label = "GPT 1.3B N32K emul P8"
for k in ("1", "4"):
    row = ulysses_row(f"ulysses_1p3b_n32k_p8_k{k}")
    rec = "" if row is None or "status" in row else row["recompute"]
    print(f"{label:<22} {'a2a K=' + k:<8} {rec:<20} {cell(row, 'step_ms', '{:.1f}'):>9} {cell(row, 'tokens', '{:,.0f}'):>11} "
          f"{cell(row, 'tflops', '{:.1f}'):>8} {cell(row, 'mfu', '{:.1%}'):>6} {cell(row, 'mem', '{:.1f}'):>8}")
    label = ""
print()
print("causal attention fwd+bwd, d = 128 (TFLOP/s; FLOPs 3.5 x 2 B H N^2 d as in bench_cuda)")
ours, ours_cudnn = {}, {}  # our flash kernels, and our cuDNN SDPA graph (kernels/cuda/attention_cudnn.cpp)
for m in re.finditer(r"^attention fwd\+bwd N=(\d+) ([\d.]+) TFLOP/s(.*)$", read("bench_cuda"), re.M):
    ours[int(m.group(1))] = m.group(2)
    c = re.search(r"cudnn ([\d.]+) TFLOP/s", m.group(3))
    ours_cudnn[int(m.group(1))] = c.group(1) if c else ("fail" if "cudnn failed" in m.group(3) else "-")
theirs = {}
for r in results("torch_attention"):
    theirs[(r["backend"], r["seq_len"])] = f"{r['fwdbwd_tflops']:.1f}" if r.get("status") == "ok" else "n/a"
lengths = sorted(set(ours) | {n for _, n in theirs})
print(f"{'N':>7} {'ulysses':>9} {'ulysses cudnn':>14} {'torch flash':>12} {'torch cudnn':>12}")
for n in lengths:
    print(f"{n:>7} {ours.get(n, '-'):>9} {ours_cudnn.get(n, '-'):>14} {theirs.get(('flash', n), '-'):>12} "
          f"{theirs.get(('cudnn', n), '-'):>12}")
PY
# every stage's whole log and CSV, for the device tool's $OUT (its reply keeps only the output's tail)
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  tar -czf "$OUT/check-logs-${only}.tgz" -C "$log_dir" . && echo "logs: \$OUT/check-logs-${only}.tgz"
fi
rm -rf "$log_dir"
status=0
for name in "${required_stages[@]}"; do
  case ${rc[$name]} in 0|77) ;; *) status=1 ;; esac
done
exit $status
