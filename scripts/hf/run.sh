#!/usr/bin/env bash
# ulysses against transformers' GPT2LMHeadModel (scripts/hf/compare_transformers.py), on the CPU:
# one rank, then `mpirun -np 2` with parallel.sequence=2, for the small shape and GPT-2 124M's.
#   scripts/hf/run.sh [--setup-only | --skip-without-venv] [ULYSSES_EXE]   (default build-cpu/apps/ulysses)
# --setup-only: make the venv and stop. --skip-without-venv (the CTest entry test_hf_transformers):
# never install; exit 77 (SKIPPED) when the venv is absent.
# The Python packages (torch, transformers, safetensors, numpy from PyPI) live in a venv made here
# when missing: $HF_VENV, default .venv-hf in the repository root (ignored by git). PyPI's Linux
# torch wheel needs its nvidia-* CUDA libraries even to import on the CPU, so the venv is large
# (about 5.6 GB; about 5 minutes to install on the 2-core CI machine; docs/benchmarks.md).
# Environment: HF_SHAPES (default small,124m), HF_JSON (append the numbers as JSON lines here).
# Exit status: 0 when every comparison passes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${HF_VENV:-$ROOT/.venv-hf}
setup_only=0 skip_without=0
case "${1:-}" in
  --setup-only) setup_only=1; shift ;;
  --skip-without-venv) skip_without=1; shift ;;
esac
EXE=${1:-$ROOT/build-cpu/apps/ulysses}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers, safetensors, numpy" 2>/dev/null; then
  if [ "$skip_without" = 1 ]; then
    echo "hf: SKIPPED: no venv with torch, transformers, safetensors at $VENV (make it with scripts/hf/run.sh --setup-only)"
    exit 77
  fi
  echo "hf: creating $VENV (torch, transformers, safetensors, numpy from PyPI)"
  t0=$(date +%s)
  python3 -m venv "$VENV"
  # pinned: the versions the numbers in docs/benchmarks.md were measured with
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.15.0 transformers==5.25.0 safetensors==0.8.0 \
    numpy==2.4.6
  echo "hf: venv ready in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)"
fi
[ "$setup_only" = 1 ] && exit 0
[ -x "$EXE" ] || { echo "hf: no ulysses executable at $EXE (build it first)" >&2; exit 2; }

if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
args=(--ulysses "$EXE" --shapes "${HF_SHAPES:-small,124m}")
[ -n "${HF_JSON:-}" ] && args+=(--json "$HF_JSON")
status=0
for np in 1 2; do
  "$VENV/bin/python" "$ROOT/scripts/hf/compare_transformers.py" "${args[@]}" --np "$np" || status=1
done
exit $status
