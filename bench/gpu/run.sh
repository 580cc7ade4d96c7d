#!/usr/bin/env bash
# Every GPU check of still in one command; JSON and logs into OUT_DIR (bench/gpu/checks.py).
#
#   bash bench/gpu/run.sh "$OUT"               # on a GPU node, with .whl/ carried: 9 minutes at most
#   bash bench/gpu/run.sh --cpu /tmp/gpu-cpu   # here: the same steps on the CPU, small sizes
#
# Beforehand, where pip reaches an index: python bench/gpu/prepare.py (fills .whl/).
# --cpu first prepares what it needs itself: .whl/ (cp312, what travels), .whl-cpu/ (the
# same wheels for this machine's Python) and a node-like virtual environment (no Ray,
# no MLflow; node_venv.py), in which it runs the checks; with a Python 3.12 at hand it
# also installs .whl/ itself into one of 3.12 and starts Ray there.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = --cpu ]; then mode=cpu; shift; else mode=gpu; fi
out=${1:?usage: bash bench/gpu/run.sh [--cpu] OUT_DIR}
if [ "$mode" = gpu ]; then
  exec python3 bench/gpu/checks.py --out "$out" --wheels .whl
fi

here_version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python3 bench/gpu/prepare.py >/dev/null
python3 bench/gpu/prepare.py --python-version "$here_version" --dest .whl-cpu >/dev/null
python=$(python3 bench/gpu/node_venv.py --requirements .whl-cpu/node-requirements.json | tail -1)
extra=()
for candidate in python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
  if "$candidate" -c '' 2>/dev/null; then
    venv312=$(python3 bench/gpu/node_venv.py --python "$candidate" --no-torch \
      --requirements .whl/node-requirements.json | tail -1)
    extra=(--py312 "$venv312")
    break
  fi
done
exec "$python" bench/gpu/checks.py --cpu --out "$out" --wheels .whl-cpu "${extra[@]}"
