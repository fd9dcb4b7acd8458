#!/usr/bin/env bash
# Evaluation timings on a CPU: train the classifier (or reuse it), print the real-data floors, and
# score 10,000 samples of an LDM.  Results go to $OUT (default bench/results/cpu).
#   DATA=/path/to/mnist MODEL=runs/ldm bash bench/eval_cpu.sh        (RETRAIN=1 to time the classifier again)
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
DATA=${DATA:-${LATENTDIFF_DATA:-../shared/data}}
MODEL=${MODEL:-runs/ldm}
OUT=${OUT:-bench/results/cpu}
CLF=${CLF:-$HOME/.cache/latentdiff/classifier}
mkdir -p "$OUT"
nproc > "$OUT/cpu.txt"; uptime >> "$OUT/cpu.txt"
$PY -m latentdiff.evaluate classifier --data-dir "$DATA" --classifier "$CLF" ${RETRAIN:+--retrain} --out "$OUT/classifier_floor.json"
time $PY -m latentdiff.evaluate ldm --model "$MODEL" --data-dir "$DATA" --classifier "$CLF" \
    --n-per-class 1000 --device cpu --out "$OUT/eval_ldm_10k.json"
