#!/usr/bin/env bash
# Prepares bench/wheels/ here, for bench/gpu.sh to install on a GPU machine that has torch and
# transformers but nothing else the project imports, and no network.
#
#   bash bench/gpu_wheels.sh            # needs the package index; then bench/wheels/ travels with the tree
#
# What goes in, each as the project has it:
# - peft, bitsandbytes, accelerate, sqlite-utils at the versions requirements.txt pins;
# - what those import that torch and transformers do not bring (psutil; sqlite-utils' click,
#   pluggy, python-dateutil, sqlite-fts4), at the versions installed in .venv.
# bitsandbytes' wheel carries a native library for every CUDA and ROCm release it supports
# (over 40 MB compressed). It is rebuilt under the same name with only the CUDA 13 builds
# (libbitsandbytes_cuda13*.so) and the CPU one (libbitsandbytes_cpu.so), its RECORD trimmed to
# match. bench/wheels/MANIFEST lists "import-name wheel-file" per line for gpu.sh. The script
# then installs everything into a scratch folder and imports it, and prints the folder's size,
# which must stay under 60 MB (the tree that travels to the GPU machine is capped at 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=bench/wheels
LIMIT_MB=60

pinned() {  # NAME==VERSION, as requirements.txt pins it
  grep -i -E "^$1==" requirements.txt || { echo "error: $1 is not pinned in requirements.txt" >&2; exit 1; }
}
installed() {  # NAME==VERSION, as the project's environment has it
  "$PY" -c 'import importlib.metadata as m, sys; print(f"{sys.argv[1]}=={m.version(sys.argv[1])}")' "$1"
}

# import name, distribution (pinned: from requirements.txt; else: as installed in $PY's environment)
PACKAGES=(
  "peft peft pinned"
  "bitsandbytes bitsandbytes pinned"
  "accelerate accelerate pinned"
  "sqlite_utils sqlite-utils pinned"
  "psutil psutil installed"
  "click click installed"
  "pluggy pluggy installed"
  "dateutil python-dateutil installed"
  "sqlite_fts4 sqlite-fts4 installed"
)

rm -rf "$DIR"
mkdir -p "$DIR"
specs=()
for entry in "${PACKAGES[@]}"; do
  read -r _module dist source <<<"$entry"
  specs+=("$($source "$dist")")
done
echo "downloading: ${specs[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR" "${specs[@]}"

: >"$DIR/MANIFEST"
for entry in "${PACKAGES[@]}"; do
  read -r module dist _source <<<"$entry"
  wheel=$(cd "$DIR" && ls "$(echo "$dist" | tr '-' '_')"-*.whl 2>/dev/null | head -1 || true)
  [ -n "$wheel" ] || { echo "error: no wheel of $dist in $DIR" >&2; exit 1; }
  echo "$module $wheel" >>"$DIR/MANIFEST"
done

"$PY" - "$DIR"/bitsandbytes-*.whl <<'EOF'
"""Rebuild the bitsandbytes wheel in place with only its CUDA 13 and CPU libraries."""
import csv, fnmatch, io, os, sys, zipfile

src = sys.argv[1]
tmp = src + ".part"


def wanted(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith("libbitsandbytes_") and base.endswith(".so")):
        return True  # Python files, metadata
    return fnmatch.fnmatch(base, "libbitsandbytes_cuda13*.so") or base == "libbitsandbytes_cpu.so"


with zipfile.ZipFile(src) as zin:
    names = zin.namelist()
    libs = sorted(n for n in names if n.endswith(".so"))
    kept = [n for n in libs if wanted(n)]
    if not any(fnmatch.fnmatch(n.rsplit("/", 1)[-1], "libbitsandbytes_cuda13*.so") for n in kept):
        sys.exit(f"error: {src} has no libbitsandbytes_cuda13*.so; its libraries are: {', '.join(libs)}")
    dropped = {n for n in names if not wanted(n)}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename in dropped:
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [row for row in csv.reader(io.StringIO(data.decode())) if row and row[0] not in dropped]
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(rows)
                data = out.getvalue().encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, src)
print(f"bitsandbytes: kept {', '.join(n.rsplit('/', 1)[-1] for n in kept)}; dropped {len(dropped)} other libraries")
EOF

check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$PY" -m pip install --quiet --no-index --no-deps --target "$check" "$DIR"/*.whl
PYTHONPATH="$check" "$PY" -c '
import sys
import bitsandbytes, peft, sqlite_utils
where = {m.__name__: m.__file__ for m in (bitsandbytes, peft, sqlite_utils)}
assert all(f.startswith(sys.argv[1]) for f in where.values()), where
print("installed and imported from the wheels:", ", ".join(f"{m.__name__} {m.__version__}" for m in (bitsandbytes, peft)))
' "$check"

total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"
echo "bench/wheels/: $(awk "BEGIN {printf \"%.1f\", $total / 1e6}") MB in all"
if [ "$total" -gt $((LIMIT_MB * 1000000)) ]; then
  echo "error: bench/wheels/ is over $LIMIT_MB MB" >&2
  exit 1
fi
