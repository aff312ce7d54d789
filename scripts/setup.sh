#!/usr/bin/env bash
# Installs what ulysses needs to build and run its tests on Debian (12 or newer) or Ubuntu, from
# the distribution's own packages only. Idempotent: packages already installed are left alone,
# and `apt-get update` runs only when something is missing. Run as root or as a user with sudo.
#   scripts/setup.sh            install what is missing
#   scripts/setup.sh --check    only report what is missing (exit 1 if anything is)
# CUDA (nvcc, cuBLAS, cuDNN, NCCL) is not installed here: a CPU-only build needs none of it.
set -euo pipefail

PACKAGES=(
  g++ make cmake pkg-config
  openmpi-bin libopenmpi-dev
  libyaml-cpp-dev libspdlog-dev libcli11-dev catch2
  libopenblas-dev libxxhash-dev nlohmann-json3-dev
)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

check_only=0
case "${1:-}" in
  "") ;;
  --check) check_only=1 ;;
  -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument '$1' (use --check or --help)" ;;
esac

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
  die "this script needs a Debian-based system (dpkg and apt-get); install by hand: ${PACKAGES[*]}"

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [ "$status" = "installed" ]; then
    say "ok        $pkg"
  else
    say "missing   $pkg"
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  say "all ${#PACKAGES[@]} packages are installed"
  exit 0
fi
if [ "$check_only" -eq 1 ]; then
  say "${#missing[@]} package(s) missing: ${missing[*]}"
  exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
  run_as_root=()
elif command -v sudo >/dev/null 2>&1; then
  run_as_root=(sudo)
  say "not root: using sudo"
else
  die "installing needs root, and sudo is not available; as root run: apt-get install ${missing[*]}"
fi

export DEBIAN_FRONTEND=noninteractive
say "apt-get update"
"${run_as_root[@]}" apt-get update || die "apt-get update failed (network? apt sources?)"
say "apt-get install ${missing[*]}"
"${run_as_root[@]}" apt-get install -y --no-install-recommends "${missing[@]}" ||
  die "apt-get install failed for: ${missing[*]}"

# Verify rather than trust the exit status.
for pkg in "${missing[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || die "$pkg is still not installed"
done
say "installed ${#missing[@]} package(s); next: cmake -S . -B build && cmake --build build -j"
