#!/usr/bin/env bash
# bench/gpu.py on a GPU machine: install what the machine lacks from bench/wheels/, then run it.
#
#   bash bench/gpu.sh              # the GPU run; JSON and log to $OUT/gpu.json when $OUT is set, else bench/results/
#   bash bench/gpu.sh --cpu        # flags go to bench/gpu.py (here: the CPU smoke run)
#
# The GPU machine has torch and transformers, but not peft, bitsandbytes or the rest of what the
# project imports, and no network. bench/gpu_wheels.sh prepares their wheels beforehand (in
# bench/wheels/, which git ignores, with a MANIFEST of "import-name wheel-file" lines) and they
# travel with the tree. Only packages that cannot be found are installed, with
# `pip install --no-index --no-deps`, into a folder of their own that goes first on PYTHONPATH,
# so the machine's environment is left as it is. Python: $PYTHON, else .venv/bin/python where
# there is one, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
WHEELS=bench/wheels
DEPS=${BENCH_DEPS:-${TMPDIR:-/tmp}/bench-gpu-deps}
export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"

missing=()
if [ -f "$WHEELS/MANIFEST" ]; then
  while read -r module wheel; do
    [ -n "$module" ] || continue
    "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$module" \
      || missing+=("$WHEELS/$wheel")
  done <"$WHEELS/MANIFEST"
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing into $DEPS: ${missing[*]##*/}"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" "${missing[@]}"
fi
"$PY" -c '
import importlib.util, sys
need = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "sqlite_utils")
gone = ", ".join(m for m in need if importlib.util.find_spec(m) is None)
if gone:
    sys.exit("error: cannot import " + gone + "; run bash bench/gpu_wheels.sh where there is network, and carry bench/wheels/")
'

if [ -n "${OUT:-}" ]; then
  out=$OUT/gpu.json
else
  out=bench/results/gpu.json
fi
mkdir -p "$(dirname "$out")"
"$PY" bench/gpu.py --out "$out" "$@" 2>&1 | tee "${out%.json}.log"
