#!/usr/bin/env bash
# Pretrain the tiny model on the GPU machine: a 40-step smoke run to measure the step rate, then several
# variants of recipes/pretrain_tiny.yaml side by side on the one GPU, each sized to the time budget, each
# exported (EMA weights, float16) with its metrics to $OUT/<name>.tar. Usage: bash benchmarks/gpu/pretrain_sweep.sh BUDGET_S NAME=OVERRIDES...
set -u
[ "${DEVICE:-cuda}" = cuda ] && source benchmarks/gpu/setup.sh
budget=${1:-420}; shift
common="train.device=${DEVICE:-cuda} data.num_workers=${WORKERS:-3} wandb.mode=disabled ${EXTRA:-}"
python3 -m dualrl.launch recipes/pretrain_tiny.yaml $common train.steps=40 eval.at_start=false eval.every=1000 \
  output_dir=/tmp/smoke 2>&1 | grep -v "it/s\]" | tail -3 || exit 1
rate=$(python3 -c "import json;s=json.load(open('/tmp/smoke/summary.json'));print(s['samples_per_s']/64)")
echo "smoke: $rate steps/s alone"
pids=()
for spec in "$@"; do
  name=${spec%%=*}; over=${spec#*=}
  bs=$(echo "$over" | grep -o 'data.batch_size=[0-9]*' | cut -d= -f2); bs=${bs:-64}
  steps=$(python3 -c "print(max(100, int($rate*${FACTOR:-0.4}*$budget*64/$bs)//100*100))")
  echo "$name: $steps steps, overrides: $over"
  ( python3 -m dualrl.launch recipes/pretrain_tiny.yaml $common train.steps=$steps eval.every=$((steps/4)) \
      train.save_every=$((steps/4)) output_dir=/tmp/runs/$name $over > /tmp/runs_$name.log 2>&1
    python3 -m dualrl.export /tmp/runs/$name /tmp/export/$name --weights ema --dtype float16 >> /tmp/runs_$name.log 2>&1
    cp /tmp/runs/$name/metrics.jsonl /tmp/runs/$name/recipe.yaml /tmp/export/$name/
    tar -C /tmp/export -cf $OUT/$name.tar $name ) &
  pids+=($!)
done
wait "${pids[@]}"
for spec in "$@"; do
  name=${spec%%=*}
  echo "== $name"; tr "\r" "\n" < /tmp/runs_$name.log | grep -i "error\|eval at\|done" | tail -6
done
