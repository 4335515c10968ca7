#!/usr/bin/env bash
# One prepared run on a GPU machine: launch/gpu_check.py (its docstring says what it runs), under $PYTHON or the
# machine's python3, the one that holds jax on the GPU machines' image.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
