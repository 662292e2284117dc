#!/usr/bin/env bash
# Continue pretraining a tiny-model export in one device call: `recipes/pretrain_tiny.yaml` from EXPORT with a fresh
# optimizer and schedule (lr $LR, 3e-4 unless set) for STEPS steps or MINUTES minutes, whichever comes first,
# evaluated on the 256 held-out `val` regions four times; its EMA exported at float16; the export's own figures
# measured twice: a run's evaluation at step 0 from it (the tables' protocol) and `python -m dualrl.eval` (every
# sentence of a region a query, with METEOR when .gpucarry/wordnet.tar.xz is there). The export, metrics, recipe
# and logs come back as $OUT/NAME.tar (15 MB parts: cat NAME.tar.part* > NAME.tar). DEVICE=cpu checks it on a CPU.
#   bash benchmarks/gpu/pretrain_continue.sh EXPORT STEPS MINUTES NAME [key=value ...]
set -u -o pipefail
[ $# -ge 4 ] || { echo "usage: $0 EXPORT STEPS MINUTES NAME [key=value ...]"; exit 2; }
src=$1 steps=$2 minutes=$3 name=$4
shift 4
OUT=${OUT:-/tmp/out}
device=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ "$device" = cuda ]; then source benchmarks/gpu/setup.sh || exit 1; fi
root=/tmp/pc/$name
rm -rf "$root" && mkdir -p "$root"
common=(train.device="$device" data.num_workers="${WORKERS:-12}" wandb.mode=disabled train.log_every=100)
start=$(date +%s)
python3 -m dualrl.launch recipes/pretrain_tiny.yaml "$@" "${common[@]}" model.pretrained="$src" \
  optim.lr="${LR:-3e-4}" eval.at_start=false train.steps="$steps" train.max_minutes="$minutes" \
  eval.every=$((steps / 4)) train.save_every="$steps" output_dir="$root/run" >"$root/run.log" 2>&1 \
  || { echo "error: the run failed"; tail -20 "$root/run.log"; exit 1; }
echo "== run: $(($(date +%s) - start)) s wall"
tr '\r' '\n' <"$root/run.log" | grep -h -o "eval at step [0-9]*: {[^}]*}" | cut -c1-150
python3 -m dualrl.export "$root/run" "$root/$name" --weights ema --dtype float16 | tail -1 || exit 1
python3 -m dualrl.launch recipes/pretrain_tiny.yaml "$@" "${common[@]}" model.pretrained="$root/$name" \
  train.steps=1 output_dir="$root/own" >"$root/own.log" 2>&1 || { echo "error: the own evaluation failed"; exit 1; }
echo "== own: $(tr '\r' '\n' <"$root/own.log" | grep -h -o "eval at step 0: {[^}]*}" | cut -c1-200)"
python3 -m dualrl.eval "$root/$name" --data shapes --split val --max-regions 256 --device "$device" \
  --out "$root/eval_cli.json" "$@" data.shapes.val_size=256 >"$root/eval_cli.log" 2>&1 || { echo "error: dualrl.eval failed"; exit 1; }
tail -3 "$root/eval_cli.log"
keep=/tmp/pc_keep/$name
rm -rf "$keep" && mkdir -p "$keep/metrics"
{
  cp -r "$root/$name" "$keep/" &&
    cp "$root/run/metrics.jsonl" "$keep/metrics/run_metrics.jsonl" &&
    cp "$root/run/recipe.yaml" "$keep/metrics/run_recipe.yaml" &&
    cp "$root/run/summary.json" "$keep/metrics/run_summary.json" &&
    cp "$root/own/metrics.jsonl" "$keep/metrics/own_eval_metrics.jsonl" &&
    cp "$root/eval_cli.json" "$keep/metrics/"
} || { echo "error: a result file is missing"; exit 1; }
tr '\r' '\n' <"$root/run.log" | grep -v "it/s\]" >"$keep/metrics/run.log"
tar -C "$keep" -cf "/tmp/$name.tar" . && split -b 15M "/tmp/$name.tar" "$OUT/$name.tar.part" || exit 1
ls -la "$OUT"
