#!/usr/bin/env bash
# Pretrain recipes/pretrain_tiny_wide.yaml on the GPU machine over two back-to-back calls (each call may run
# 10 minutes; the warm machine keeps /tmp between them). Usage:
#   bash benchmarks/gpu/pretrain_wide.sh start TRAIN_S MINUTES   # smoke-time the step, size the schedule to
#                                                                  # TRAIN_S seconds of training, train MINUTES
#   bash benchmarks/gpu/pretrain_wide.sh resume MINUTES           # continue the same run (same schedule)
# Each call exports the EMA weights (float16) with the run's metrics, recipe and log to $OUT, split into
# 15 MB parts (join: cat shapes-tiny-wide.tar.part* > shapes-tiny-wide.tar).
set -u
[ "${DEVICE:-cuda}" = cuda ] && source benchmarks/gpu/setup.sh
run=/tmp/ptw
common="train.device=${DEVICE:-cuda} data.num_workers=${WORKERS:-12} wandb.mode=disabled output_dir=$run ${EXTRA:-}"
case "$1" in
  start)
    python3 -m dualrl.launch recipes/pretrain_tiny_wide.yaml $common train.steps=40 eval.at_start=false \
      eval.every=1000 output_dir=/tmp/ptw_smoke 2>&1 | tail -2 || exit 1
    rate=$(python3 -c "import json,yaml;s=json.load(open('/tmp/ptw_smoke/summary.json'))
print(s['samples_per_s']/yaml.safe_load(open('/tmp/ptw_smoke/recipe.yaml'))['data']['batch_size'])") || exit 1
    steps=$(python3 -c "print(max(100, int($rate*$2)//100*100))")
    echo "smoke: $rate steps/s (40 steps, start-up included); schedule: $steps steps"
    echo "$steps" > /tmp/ptw_steps
    minutes=$3 ;;
  resume)
    [ -f /tmp/ptw_steps ] || { echo "error: no run to resume in /tmp (the machine was not kept warm)"; exit 3; }
    minutes=$2 ;;
  *) echo "usage: $0 start TRAIN_S MINUTES | resume MINUTES"; exit 2 ;;
esac
steps=$(cat /tmp/ptw_steps)
python3 -m dualrl.launch recipes/pretrain_tiny_wide.yaml $common train.steps=$steps eval.every=500 \
  train.save_every=500 train.max_minutes=$minutes 2>&1 | tr "\r" "\n" | grep -v "it/s\]" >> /tmp/ptw.log
[ -f $run/summary.json ] || { tail -20 /tmp/ptw.log; exit 1; }
grep -i "error\|traceback\|eval at\|done\|stopped\|resumed" /tmp/ptw.log | tail -14
rm -rf /tmp/export && python3 -m dualrl.export $run /tmp/export/shapes-tiny-wide --weights ema --dtype float16 \
  | tail -1 || exit 1
cp $run/metrics.jsonl $run/recipe.yaml $run/summary.json /tmp/ptw.log /tmp/export/
tar -C /tmp/export -cf /tmp/shapes-tiny-wide.tar . && split -b 15M /tmp/shapes-tiny-wide.tar $OUT/shapes-tiny-wide.tar.part
ls -la $OUT
