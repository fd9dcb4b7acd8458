#!/usr/bin/env bash
# One prepared GPU session in two parts, each well under 10 minutes (results under $OUT, partial
# results survive a timeout):
#   PART=quick  train quick-preset variants (fp32, as on a CPU) and score each at several guidance
#               settings: which training change buys quality for the same CPU minutes (issue 8).
#   PART=full   training-step speed with/without compile, the full preset trained and timed end to end,
#               a guidance sweep with intervals, the default point at N=10,000, sampling throughput
#               eager and compiled (issue 12).
#   DATA=/path/to/mnist PART=full bash bench/gpu_session.sh
# Knobs for a CPU dry run: DEVICE=cpu, and the *_ARGS / N_* variables below.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-out/gpu}
DATA=${DATA:-${LATENTDIFF_DATA:-}}
R=${RUNS:-/tmp/latentdiff_gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PART=${PART:-full}
mkdir -p "$OUT" "$R/res"
step() { echo "== $(date +%T) $*"; }
keep() { tar czf "$OUT/results_$PART.tgz" -C "$R" res; }  # re-packed after every phase
now() { date +%s.%N; }
elapsed() { $PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
# Non-TTY logs are one line per interval; keep only the last lines of each training log on the console.
train() { local log=$1; shift; "$@" > "$log" 2>&1; local rc=$?; tail -n 2 "$log"; return $rc; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)"; } | tee "$R/res/machine.txt"
CLF=${CLASSIFIER:-$R/classifier}
SCORE="$PY bench/score_settings.py --data-dir $DATA --classifier $CLF --device $DEVICE"

if [ "$PART" = quick ]; then
  # name | VAE overrides ("" = the shared base VAE) | LDM overrides
  VARIANTS=${VARIANTS:-"base||
minsnr||diffusion.loss_weighting=min_snr
drop20||diffusion.label_dropout=0.2
lr3e3||train.lr=3e-3
trim|train.steps=300|train.steps=1350
trim_minsnr|train.steps=300|train.steps=1350 diffusion.loss_weighting=min_snr"}
  Q="--config quick --data-dir $DATA ${QUICK_ARGS:-}"  # plain python: fp32, as on a CPU
  step "base VAE"
  t0=$(now); train "$R/res/vae_base.log" $PY train_vae.py $Q --out "$R/vae_base" --overwrite; echo "vae_base $(elapsed $t0 $(now)) s" | tee -a "$R/res/times.txt"
  models=()
  while IFS='|' read -r name vset lset; do
    [ -z "$name" ] && continue
    vae="$R/vae_base"
    if [ -n "$vset" ]; then
      vae="$R/vae_$name"; args=(); for s in $vset; do args+=(--set "$s"); done
      t0=$(now); train "$R/res/vae_$name.log" $PY train_vae.py $Q "${args[@]}" --out "$vae" --overwrite; echo "vae_$name $(elapsed $t0 $(now)) s" | tee -a "$R/res/times.txt"
    fi
    args=(); for s in $lset; do args+=(--set "$s"); done
    step "LDM variant $name: ${vset:-base VAE} / ${lset:-quick}"
    t0=$(now); train "$R/res/ldm_$name.log" $PY train_ldm.py $Q "${args[@]}" --vae "$vae" --out "$R/ldm_$name" --overwrite
    echo "ldm_$name $(elapsed $t0 $(now)) s" | tee -a "$R/res/times.txt"
    cp "$R/ldm_$name/metrics.jsonl" "$R/res/metrics_$name.jsonl" 2>/dev/null
    models+=("$R/ldm_$name"); keep
  done <<< "$VARIANTS"
  step "score every variant (N=${N_QUICK:-200} per class)"
  SETTINGS=${QUICK_SETTINGS:-'{"guidance_scale": 1.5} {"guidance_scale": 2.0} {"guidance_scale": 2.0, "guidance_interval": [100, 800]} {"guidance_scale": 3.0, "guidance_interval": [100, 600]} {"guidance_scale": 3.0, "guidance_interval": [100, 800]} {"guidance_scale": 4.0, "guidance_interval": [150, 600]}'}
  $PY - "$SETTINGS" > "$R/settings.txt" <<'PY'
import json, re, sys
for m in re.findall(r"\{[^{}]*\}", sys.argv[1]):
    print(json.dumps(json.loads(m)))
PY
  mapfile -t sets < "$R/settings.txt"
  timeout ${SCORE_TIMEOUT:-240} $SCORE --models "${models[@]}" --n-per-class ${N_QUICK:-200} --settings "${sets[@]}" --out "$R/res/quick_scores.jsonl"
  keep
  for m in base minsnr; do [ -d "$R/ldm_$m" ] && tar czf "$OUT/quick_$m.tgz" -C "$R" --exclude checkpoints "ldm_$m"; done
  step "done"
  exit 0
fi

# ------------------------------------------------------------------------------------- PART=full
step "training-step speed, eager and compiled"
timeout ${SPEED_TIMEOUT:-150} $PY bench/train_speed.py --preset full --device $DEVICE --batches ${SPEED_BATCHES:-512 1024 2048 4096} \
  --compile no --steps ${SPEED_STEPS:-20} --out "$R/res/train_speed_eager.json"
timeout ${SPEED_TIMEOUT:-150} $PY bench/train_speed.py --preset full --device $DEVICE --batches ${SPEED_BATCHES_C:-1024 2048} \
  --compile yes --steps ${SPEED_STEPS:-20} --out "$R/res/train_speed_compiled.json"
keep
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision bf16"
step "train the full preset, timed end to end"
t0=$(now)
train "$R/res/train_vae.log" $LAUNCH train_vae.py --config full --data-dir "$DATA" --out "$R/vae" --overwrite ${VAE_ARGS:-}
t1=$(now)
train "$R/res/train_ldm.log" $LAUNCH train_ldm.py --config full --data-dir "$DATA" --vae "$R/vae" --out "$R/ldm" --overwrite ${LDM_ARGS:-}
t2=$(now)
echo "{\"vae_s\": $(elapsed $t0 $t1), \"ldm_s\": $(elapsed $t1 $t2), \"total_s\": $(elapsed $t0 $t2)}" | tee "$R/res/train_time.json"
cp "$R/vae/metrics.jsonl" "$R/res/vae_metrics.jsonl"; cp "$R/ldm/metrics.jsonl" "$R/res/ldm_metrics.jsonl"; cp "$R/ldm/run.yaml" "$R/res/ldm_run.yaml"
keep
step "score: guidance x interval sweep (N=${N_SWEEP:-500} per class), then the default at N=${N_FINAL:-1000}"
FULL_SETTINGS=${FULL_SETTINGS:-'{"guidance_scale": 1.2} {"guidance_scale": 1.5} {"guidance_scale": 2.0, "guidance_interval": [100, 800]} {"guidance_scale": 2.0, "guidance_interval": [150, 600]} {"guidance_scale": 3.0, "guidance_interval": [150, 600]} {"guidance_scale": 2.5, "guidance_interval": [100, 700]}'}
$PY - "$FULL_SETTINGS" > "$R/settings.txt" <<'PY'
import json, re, sys
for m in re.findall(r"\{[^{}]*\}", sys.argv[1]):
    print(json.dumps(json.loads(m)))
PY
mapfile -t sets < "$R/settings.txt"
timeout ${SCORE_TIMEOUT:-150} $SCORE --models "$R/ldm" --n-per-class ${N_SWEEP:-500} --settings "${sets[@]}" --out "$R/res/full_sweep.jsonl"
timeout ${SCORE_TIMEOUT:-150} $SCORE --models "$R/ldm" --n-per-class ${N_FINAL:-1000} --settings '{}' --out "$R/res/full_default.jsonl"
$PY -m latentdiff.evaluate vae --model "$R/vae" --data-dir "$DATA" --classifier "$CLF" --device $DEVICE --out "$R/res/eval_vae.json" | tail -n 12
$PY sample.py --model "$R/ldm" --out "$R/res/samples_full.png" --device $DEVICE | tail -n 1
keep
step "sampling throughput at the default settings: eager, then compiled"
timeout ${TP_TIMEOUT:-60} $PY bench/throughput.py --preset full --model "$R/ldm" --device $DEVICE --batches ${TP_BATCHES:-1 256 4096} --skip-train --out "$R/res/throughput_eager.json"
keep
timeout ${TPC_TIMEOUT:-150} $PY bench/throughput.py --preset full --model "$R/ldm" --device $DEVICE --batches ${TPC_BATCHES:-4096 256} --skip-train --compile --out "$R/res/throughput_compiled.json"
keep
tar czf "$OUT/full_ldm.tgz" -C "$R" --exclude checkpoints ldm 2>/dev/null
step "done"
