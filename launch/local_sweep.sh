#!/usr/bin/env bash
# Runs a sweep on this machine: N processes at once (default 1), each training and evaluating every N-th group
# of runs (python -m icl_jax.sweep --shard=i/N), then the report. Interrupted? Run it again: finished runs are
# skipped and interrupted ones resume from their checkpoints.
#
#   launch/local_sweep.sh [-n N] [--dry-run] CONFIG ROOT [--config.FIELD=VALUE ...]
#   launch/local_sweep.sh -n 2 configs/sweep_depth_kappa.py:quick runs/sweep_quick
set -euo pipefail
cd "$(dirname "$0")/.."
processes=1
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) processes="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "usage: launch/local_sweep.sh [-n N] [--dry-run] CONFIG ROOT [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local_sweep.sh: -n must be a positive integer, got '$processes'" >&2
  exit 2
fi
config="$1"; root="$2"; shift 2
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && python="${PYTHON:-.venv/bin/python}"
run() {
  printf '%q ' "$@"; echo
  [ "$dry_run" = 1 ] || "$@"
}
pids=()
for ((i = 0; i < processes; i++)); do
  if [ "$dry_run" = 1 ]; then
    run "$python" -m icl_jax.sweep --config="$config" --root="$root" --stage=runs --shard="$i/$processes" "$@"
  else
    mkdir -p "$root"
    run "$python" -m icl_jax.sweep --config="$config" --root="$root" --stage=runs --shard="$i/$processes" "$@" \
      > "$root/shard_$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
if [ "$status" != 0 ]; then
  echo "launch/local_sweep.sh: a shard failed; see $root/shard_*.log" >&2
  exit 1
fi
run "$python" -m icl_jax.sweep --config="$config" --root="$root" --stage=report "$@"
