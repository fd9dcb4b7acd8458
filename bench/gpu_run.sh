#!/usr/bin/env bash
# One prepared GPU session (issue 5): train the full preset end to end and time it, score it,
# sweep guidance and samplers, and benchmark throughput. Results go to $OUT (default out/gpu).
#   DATA=/path/to/mnist bash bench/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-out/gpu}
DATA=${DATA:-${LATENTDIFF_DATA:-}}
R=${RUNS:-/tmp/latentdiff_gpu}
N=${N_PER_CLASS:-1000}
mkdir -p "$OUT" "$R/res"
PY=${PY:-python3}
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision bf16"
step() { echo "== $(date +%T) $*"; }
keep() { cp -f "$@" "$R/res/" 2>/dev/null; tar czf "$OUT/results.tgz" -C "$R" res; }  # partial results survive a timeout

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/res/gpu.txt"
$PY -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$R/res/gpu.txt"

step "train VAE (full)"
t0=$(date +%s.%N)
$LAUNCH train_vae.py --config full --data-dir "$DATA" --out "$R/vae" --overwrite ${VAE_ARGS:-} > "$R/res/train_vae.log" 2>&1 || { tail -5 "$R/res/train_vae.log"; }
t1=$(date +%s.%N)
step "train LDM (full)"
$LAUNCH train_ldm.py --config full --data-dir "$DATA" --vae "$R/vae" --out "$R/ldm" --overwrite ${LDM_ARGS:-} > "$R/res/train_ldm.log" 2>&1 || { tail -5 "$R/res/train_ldm.log"; }
t2=$(date +%s.%N)
$PY - "$t0" "$t1" "$t2" > "$R/res/train_time.json" <<'PY'
import json, sys
t0, t1, t2 = map(float, sys.argv[1:])
print(json.dumps({"vae_s": t1 - t0, "ldm_s": t2 - t1, "total_s": t2 - t0, "note": "wall time incl. process start, data load, latent encoding, final save"}))
PY
cat "$R/res/train_time.json"
tail -n 2 "$R/vae/metrics.jsonl" "$R/ldm/metrics.jsonl"
keep "$R/vae/metrics.jsonl" "$R/vae/loss.png" "$R/vae/previews/final.png" "$R/ldm/loss.png" "$R/ldm/previews/final.png"
cp "$R/vae/metrics.jsonl" "$R/res/vae_metrics.jsonl"; cp "$R/ldm/metrics.jsonl" "$R/res/ldm_metrics.jsonl"
cp "$R/vae/previews/final.png" "$R/res/vae_preview.png"; cp "$R/ldm/previews/final.png" "$R/res/ldm_preview.png"

step "sample grid"
$PY sample.py --model "$R/ldm" --out "$OUT/samples_full.png" --device "${DEVICE:-cuda}" 2>&1 | tail -1

step "throughput (eager)"
$PY bench/throughput.py --preset full --model "$R/ldm" --device "${DEVICE:-cuda}" --batches ${BATCHES:-1 256 4096} --train-steps ${TRAIN_STEPS:-50} --out "$R/res/throughput_eager.json"
keep
step "evaluate LDM + VAE"
$PY -m latentdiff.evaluate ldm --model "$R/ldm" --data-dir "$DATA" --n-per-class "$N" --classifier "$R/classifier" --out "$R/res/eval_ldm.json" --samples "$R/res/eval_samples.png"
$PY -m latentdiff.evaluate vae --model "$R/vae" --data-dir "$DATA" --classifier "$R/classifier" --out "$R/res/eval_vae.json"
keep
step "sweep"
$PY -m latentdiff.evaluate sweep --model "$R/ldm" --data-dir "$DATA" --n-per-class "${SWEEP_N:-500}" --classifier "$R/classifier" \
    --guidance 1 1.5 2 3 4 6 --samplers dpm++:5 dpm++:10 dpm++:15 dpm++:20 ddim:10 ddim:20 ddim:50 ddpm:1000 \
    --out "$R/res/sweep.json" --plot "$R/res/sweep.png"
keep
step "throughput (torch.compile, CUDA graphs)"
timeout 150 $PY bench/throughput.py --preset full --model "$R/ldm" --device "${DEVICE:-cuda}" --batches 4096 256 --skip-train --compile --out "$R/res/throughput_compiled.json"
keep
step "done"
