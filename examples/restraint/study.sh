#!/bin/bash
# The restraint study of issue 15 for one model: N sequential ROME edits (CounterFact records 0..N-1), then
#   no restraint | paper once (log, alpha 1.2) | scale-free once (strength 0.5) | --target-kappa 1.25 x kappa(W) once
#   | adaptive during editing (--kappa-trigger 1.25 x kappa(W) --target-kappa 1.1 x kappa(W)),
# each evaluated like examples/Makefile does (CounterFact on the N records, WikiText perplexity on 4,096 tokens,
# window 512, stride 448; key statistics on 50,000 WikiText tokens). Steps already done are skipped.
#
#   bash examples/restraint/study.sh smollm2 work-restraint/smollm2 100
#   bash examples/restraint/study.sh /work/models/gemma3-270m work-restraint/gemma3 50
#   python examples/restraint/table.py work-restraint/smollm2 100
#
# PRUNECLI (default `python -m prunecli`) and DATA (default ../shared/data) can be overridden; run heavy steps one
# at a time on a shared machine (OMP_NUM_THREADS=1 flock LOCK bash study.sh ...).
set -euo pipefail
model=$1; work=$2; n=$3
PRUNECLI=${PRUNECLI:-python -m prunecli}
DATA=${DATA:-../shared/data}
CF=$DATA/counterfact/counterfact-edit.json
EV=(--requests "$CF" --limit "$n" --tasks counterfact,perplexity --max-tokens 4096 --window 512 --stride 448
    --batch-size 16 --data-dir "$DATA")
mkdir -p "$work"
w=$work
run() { local out=$1; shift; [ -f "$out" ] || "$@"; }
# `inspect_to OUT DELTA`: the spectra report of DELTA into OUT, written through a temporary so that an interrupted or
# failed step leaves no empty OUT behind (a redirect on `run` would create OUT before `run` checks for it).
inspect_to() { [ -s "$1" ] || { $PRUNECLI inspect "$model" --delta "$2" --json > "$1.tmp" && mv "$1.tmp" "$1"; }; }

run $w/stats-rome.safetensors $PRUNECLI stats "$model" --method rome --text "$DATA/wikitext/wiki.test.raw" \
    --tokens 50000 -o $w/stats-rome.safetensors --force --json > /dev/null
edit=($PRUNECLI edit "$model" --requests "$CF" --start 0 --limit "$n" --stats $w/stats-rome.safetensors --method rome)
[ -f $w/edited-$n.safetensors ] || "${edit[@]}" -o $w/edited-$n.safetensors --force --json > $w/edited-$n.json
inspect_to $w/edited-$n.inspect.json $w/edited-$n.safetensors
# kappa(W) of the edited matrix (the worst one if several), as inspect reports it
kw=$(python -c "import json,sys; print(max(t['kappa'] for t in json.load(open(sys.argv[1]))['tensors'] if t.get('edited')))" \
     $w/edited-$n.inspect.json)
k125=$(python -c "print(1.25 * $kw)"); k110=$(python -c "print(1.1 * $kw)")
[ -f $w/adaptive-$n.safetensors ] || "${edit[@]}" --kappa-trigger "$k125" --target-kappa "$k110" \
    -o $w/adaptive-$n.safetensors --force --json > $w/adaptive-$n.json
prune() { local kind=$1; shift; [ -f $w/$kind-$n.safetensors ] || $PRUNECLI prune "$model" \
    $w/edited-$n.safetensors "$@" -o $w/$kind-$n.safetensors --force --json > $w/$kind-$n.json; }
prune paper --fn log --alpha 1.2
prune scalefree --fn scale-free --strength 0.5
prune target --target-kappa "$k125"
[ -f $w/base-$n.eval.json ] || $PRUNECLI evaluate "$model" "${EV[@]}" -o $w/base-$n.eval.json --force > /dev/null
for kind in edited adaptive paper scalefree target; do
    [ -f $w/$kind-$n.eval.json ] || $PRUNECLI evaluate "$model" --delta $w/$kind-$n.safetensors "${EV[@]}" \
        -o $w/$kind-$n.eval.json --force > /dev/null
    inspect_to $w/$kind-$n.inspect.json $w/$kind-$n.safetensors
done
