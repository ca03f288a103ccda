#!/usr/bin/env bash
# One-GPU check (issue 20): CUDA tests, decode speed sweep, how-many-fit; < 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh                  # on any single-GPU machine (no internet needed)
#   bash benchmarks/gpu_check.sh --write-results  # and write the "gpu-check" section of RESULTS.md
#   bash benchmarks/gpu_check.sh --dry-run        # the same steps on CPU, tiny sizes, seconds
#
# Python: $PYTHON, else .venv/bin/python when it has a CUDA torch (or with --dry-run), else
# python3. kvbound runs from src/ (no install). If the machine's transformers is older than
# kvbound needs, run `bash benchmarks/gpu_check.sh --fetch-wheels` where PyPI is reachable: the
# wheels land in .whl/ (git-ignored; carry it to the GPU machine) and are installed to a
# temporary directory before the run. Results: $OUT (when set) or runs/gpu_check/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ARGS=()
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1; ARGS+=("$a") ;;
    --write-results) ARGS+=("$a") ;;
    --fetch-wheels)  # here, with PyPI: the wheels a GPU image with an older transformers needs
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "transformers==5.24.0"
      ls .whl; exit 0 ;;
    *) echo "usage: $0 [--dry-run] [--write-results] | --fetch-wheels" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=python3
  if [ -x .venv/bin/python ] && { [ "$DRY" = 1 ] ||
      .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }; then
    PY=.venv/bin/python
  fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kvbound-site .whl/*.whl
  export PYTHONPATH="/tmp/kvbound-site:$PYTHONPATH"
fi
"$PY" - <<'PY'
import sys
import torch, transformers
from importlib.metadata import version
need = (5, 24)
have = tuple(int(x) for x in transformers.__version__.split(".")[:2])
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, CUDA {torch.cuda.is_available()}", flush=True)
if have < need:
    sys.exit(f"transformers {transformers.__version__} is older than kvbound needs "
             f"({'.'.join(map(str, need))}): bring wheels in .whl/ (see the script's header).")
PY
OUTDIR=${OUT:-$ROOT/runs/gpu_check}
exec "$PY" benchmarks/gpu_check.py --out "$OUTDIR" ${ARGS[@]+"${ARGS[@]}"}
