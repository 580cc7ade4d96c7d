#!/usr/bin/env bash
# Installs still and its stack into the current Python environment.
# torch goes first: with no torch installed, pip would resolve a multi-GB CUDA build;
# 2.13.0 is the CPU wheel these machines carry (a GPU machine keeps its own torch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[dev,s3]"
