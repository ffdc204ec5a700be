#!/usr/bin/env bash
# One call that checks tide-local on a machine with an NVIDIA GPU (benchmarks/gpu_check.py does
# the work; `--help` there lists every option).
#
#   benchmarks/gpu_check.sh --prepare DIR     # with network: the pinned ggml sources (CPU and CUDA
#                                             # backends, a small tarball) and the dependency wheels
#   benchmarks/gpu_check.sh DIR               # on the GPU machine, offline: builds ggml with CUDA for
#                                             # its GPU, makes a model, runs the device tests, compares
#                                             # logits with the CPU, measures every placement, upload
#                                             # bandwidth and the planner; about 8 minutes in all
#   benchmarks/gpu_check.sh --no-gpu DIR      # every part that needs no GPU (the emulated device)
#
# The report goes to benchmarks/results/gpu.md (and gpu.json); a stage that fails or runs out of
# time is reported there and the next one runs. Keep DIR out of git: `/.gpucheck/` is the
# conventional name (add it to .git/info/exclude).
#
# Needs: Python >= 3.11 (PYTHON, else python3, else python) with numpy and torch; for the GPU part
# also CUDA's compiler (nvcc), CMake and ninja or make.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
    done
fi
[ -n "$PY" ] || { echo "gpu_check.sh: no python3 on PATH (set PYTHON)" >&2; exit 2; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "gpu_check.sh: $("$PY" --version 2>&1) is too old: the check needs Python >= 3.11" >&2; exit 2; }

case "${1:-}" in
    --prepare)
        [ $# -eq 2 ] || { echo "usage: gpu_check.sh --prepare DIR" >&2; exit 2; }
        exec "$PY" "$HERE/gpu_check.py" prepare "$2" ;;
    -h|--help|"")
        sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
        [ -n "${1:-}" ] && exec "$PY" "$HERE/gpu_check.py" check --help
        exit 2 ;;
    *) exec "$PY" "$HERE/gpu_check.py" check "$@" ;;
esac
