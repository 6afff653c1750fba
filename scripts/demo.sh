#!/usr/bin/env bash
# The prunecli demo, set-up included: key statistics on a WikiText slice, five sequential ROME edits on SmolLM2-135M,
# the PRUNE restraint, spectra, before/after completions and the editing metrics of edited vs pruned model
# (teacher-forced and by greedy generation, with 95 % intervals and a paired comparison).
# Outputs go to demo-out/ (re-running overwrites them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${PRUNECLI_DATA_DIR:-../shared/data}
OUT=demo-out
REQ=examples/demo_requests.jsonl
mkdir -p "$OUT"
[ -f "$DATA/wikitext/wiki.test.raw" ] || { echo "demo: $DATA/wikitext/wiki.test.raw not found (set PRUNECLI_DATA_DIR)" >&2; exit 1; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1. key statistics of the ROME layer (20k WikiText tokens)"
prunecli stats smollm2 --method rome --text "$DATA/wikitext/wiki.test.raw" --tokens 20000 -o "$OUT/stats.safetensors" --force

step "2. five sequential ROME edits -> delta file (each checked by what greedy decoding writes)"
prunecli edit smollm2 --requests "$REQ" --method rome --stats "$OUT/stats.safetensors" -o "$OUT/edits.safetensors" --force \
  --check generation

step "3. PRUNE restraint of the accumulated delta (log, alpha 1.2)"
prunecli prune smollm2 "$OUT/edits.safetensors" -o "$OUT/pruned.safetensors" --force

step "4. spectrum of the edited matrix: W, W + D, and D"
prunecli inspect smollm2 --delta "$OUT/edits.safetensors" --top 5

step "5. greedy completions before / after the edits"
python examples/completions.py smollm2 "$REQ" --delta "$OUT/edits.safetensors"

step "6. editing metrics, teacher-forced and by generation, with intervals: edited vs pruned (paired)"
prunecli evaluate smollm2 --delta "$OUT/edits.safetensors" --requests "$REQ" -t counterfact,counterfact-gen \
  -o "$OUT/edited.json" --force > /dev/null
prunecli evaluate smollm2 --delta "$OUT/pruned.safetensors" --requests "$REQ" -t counterfact,counterfact-gen \
  -o "$OUT/pruned.json" --force > /dev/null
prunecli evaluate --compare "$OUT/edited.json" "$OUT/pruned.json"
