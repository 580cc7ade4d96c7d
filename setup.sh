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
# builtin:fashion-mnist reads Debian's dataset-fashion-mnist (30 MB of IDX files). Installed
# when apt-get can run without a password; otherwise the Fashion-MNIST configs say how and
# their tests skip.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=skip; fi
  if [ "$SUDO" != skip ]; then
    { $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && \
      $SUDO apt-get install -y -q dataset-fashion-mnist; }; } >/dev/null 2>&1 || \
      echo "setup.sh: could not install dataset-fashion-mnist; builtin:fashion-mnist will not be available" >&2
  else
    echo "setup.sh: builtin:fashion-mnist needs 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi
