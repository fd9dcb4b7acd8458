#!/usr/bin/env bash
# Issue 16's GPU target in one prepared session (a few minutes on an H100): the quick VAE and LDM trained on
# the GPU, both distillation presets run on that teacher, then teacher vs student sampling speed at a GPU batch,
# eager and compiled (bench/distill_speed.py, alternating in one process), and each model's default scored at
# N = 10,000. Results under $OUT (speed_*.json, scores_*.json, the logs, times.txt), written after every phase.
#   DATA=/path/to/mnist OUT=out/gpu_distill bash bench/gpu_distill.sh
# A CPU dry run of the whole script (tiny runs, small batches):
#   DATA=DIR DEVICE=cpu TRAIN_SET="--set train.steps=30" BATCH=64 REPEATS=1 N_PER_CLASS=5 CLASSIFIER=DIR \
#     bash bench/gpu_distill.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DATA=${DATA:?set DATA to the folder with the MNIST IDX files}
OUT=${OUT:-out/gpu_distill}
R=${RUNS:-/tmp/latentdiff_gpu_distill}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-4096}
REPEATS=${REPEATS:-10}
N_PER_CLASS=${N_PER_CLASS:-1000}
CLF=${CLASSIFIER:-$R/classifier}  # the judge's folder: trained there (a minute on a GPU) if missing
TRAIN_SET=${TRAIN_SET:-}  # extra --set overrides for every training run (the dry run shortens them)
# --mixed_precision no: each preset's own train.mixed_precision (auto: bf16 on a GPU) decides, as in `make demo`.
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no"
mkdir -p "$OUT" "$R"
step() { echo "== $(date +%T) $*" | tee -a "$OUT/times.txt"; }
timed() {  # timed NAME CMD...: runs CMD with its output in $OUT/NAME.log, and its wall time in times.txt
  local name=$1 t0 rc; shift; t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1; rc=$?
  $PY -c "import sys; print(f'{sys.argv[1]}: {float(sys.argv[3]) - float(sys.argv[2]):.1f} s, exit {sys.argv[4]}')" \
    "$name" "$t0" "$(date +%s.%N)" "$rc" | tee -a "$OUT/times.txt"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)"; } \
  | tee "$OUT/machine.txt"

step "1. the teacher: quick VAE and LDM"
timed train_vae $LAUNCH train_vae.py --config quick --data-dir "$DATA" --out "$R/vae" --overwrite $TRAIN_SET || exit 1
timed train_ldm $LAUNCH train_ldm.py --config quick --data-dir "$DATA" --vae "$R/vae" --out "$R/ldm" --overwrite \
  $TRAIN_SET || exit 1

step "2. the students: LCD (quick preset) and progressive"
timed distill_lcd $LAUNCH distill_ldm.py --config quick --teacher "$R/ldm" --out "$R/lcd" --data-dir "$DATA" \
  --overwrite $TRAIN_SET || exit 1
timed distill_pd $LAUNCH distill_ldm.py --config progressive --teacher "$R/ldm" --out "$R/pd" --data-dir "$DATA" \
  --overwrite $TRAIN_SET || exit 1

step "3. sampling speed, teacher and students side by side: eager, then compiled"
for mode in eager compiled; do
  flag=$([ $mode = compiled ] && echo --compile)
  timed "speed_lcd_$mode" $PY bench/distill_speed.py --teacher "$R/ldm" --student "$R/lcd" --student-steps 1 2 4 \
    --batch-size "$BATCH" --repeats "$REPEATS" --device "$DEVICE" $flag --out "$OUT/speed_lcd_$mode.json"
  timed "speed_pd_$mode" $PY bench/distill_speed.py --teacher "$R/ldm" --student "$R/pd" \
    --batch-size "$BATCH" --repeats "$REPEATS" --device "$DEVICE" $flag --out "$OUT/speed_pd_$mode.json"
done
grep -H "digits/s" "$OUT"/speed_*.log | tee -a "$OUT/times.txt"

step "4. each model at its default, N = $((10 * N_PER_CLASS)) (the classifier is trained first if missing)"
for m in ldm lcd pd; do
  timed "scores_$m" $PY -m latentdiff.evaluate sweep --model "$R/$m" --data-dir "$DATA" --device "$DEVICE" \
    --n-per-class "$N_PER_CLASS" --classifier "$CLF" --settings '{}' --out "$OUT/scores_$m.json"
done
step done
