#!/usr/bin/env bash
# timed.sh FILE CMD...: run CMD, then write its wall time in seconds to FILE (only if CMD succeeded), so each make
# step's cost ends up beside its output and in the study's summary.
set -euo pipefail
out=$1
shift
start=$(date +%s.%N)
"$@"
end=$(date +%s.%N)
awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f\n", b - a }' > "$out.tmp"
mv "$out.tmp" "$out"
