#!/usr/bin/env bash
# Pretrain several tiny-model variants side by side on the one GPU (a tiny step leaves the GPU mostly idle, so
# runs sharing it barely slow each other), over back-to-back calls of at most 10 minutes each: the warm
# machine keeps /tmp between calls, and `train.max_minutes` stops each run at a step boundary with a
# checkpoint that the next call resumes. Usage:
#   bash benchmarks/gpu/pretrain_variants.sh start TRAIN_S MINUTES NAME=RECIPE[,key=value...] ...
#       time 60 steps of every variant (all at once, as they will run), size each one's schedule to TRAIN_S
#       seconds of training at that rate, then train them all for MINUTES
#   bash benchmarks/gpu/pretrain_variants.sh resume MINUTES
# After each call every variant's EMA weights (float16) are exported with its metrics, recipe, summary and log
# to $OUT/NAME.tar, split into 15 MB parts (join: cat NAME.tar.part* > NAME.tar).
set -u -o pipefail  # an export that fails fails its pipeline
[ "${DEVICE:-cuda}" = cuda ] && source benchmarks/gpu/setup.sh
state=/tmp/pv
common="train.device=${DEVICE:-cuda} data.num_workers=${WORKERS:-4} wandb.mode=disabled ${EXTRA:-}"
mode=$1; shift
case "$mode" in
  start)
    train_s=$1; minutes=$2; shift 2
    rm -rf $state; mkdir -p $state; printf "%s\n" "$@" > $state/specs
    while read -r spec; do
      name=${spec%%=*}; args=${spec#*=}; args=${args//,/ }
      python3 -m dualrl.launch $args $common train.steps=60 eval.at_start=false eval.every=1000 \
        output_dir=$state/smoke_$name > $state/smoke_$name.log 2>&1 &
    done < $state/specs
    wait
    while read -r spec; do
      name=${spec%%=*}
      rate=$(python3 -c "import json,yaml;d='$state/smoke_$name/';s=json.load(open(d+'summary.json'))
print(s['samples_per_s']/yaml.safe_load(open(d+'recipe.yaml'))['data']['batch_size'])") \
        || { tail -5 $state/smoke_$name.log; exit 1; }
      steps=$(python3 -c "print(max(100, int($rate*$train_s)//100*100))")
      echo "$name: smoke $rate steps/s (60 steps side by side, start-up included) -> $steps steps"
      echo "$steps" > $state/$name.steps
    done < $state/specs ;;
  resume)
    [ -f $state/specs ] || { echo "error: no runs to resume in $state (the machine was not kept warm)"; exit 3; }
    minutes=$1 ;;
  *) echo "usage: $0 start TRAIN_S MINUTES NAME=RECIPE[,key=value...] ... | resume MINUTES"; exit 2 ;;
esac
while read -r spec; do
  name=${spec%%=*}; args=${spec#*=}; args=${args//,/ }
  python3 -m dualrl.launch $args $common output_dir=$state/$name train.steps=$(cat $state/$name.steps) \
    eval.every=500 train.save_every=500 train.max_minutes=$minutes 2>&1 | tr "\r" "\n" \
    | grep -v "it/s\]" >> $state/$name.log &
done < $state/specs
wait
failed=0
while read -r spec; do
  name=${spec%%=*}; run=$state/$name; ex=/tmp/export_$name
  echo "== $name"; grep -i "error\|traceback\|eval at\|done\|stopped\|resumed" $state/$name.log | tail -8
  [ -f $run/summary.json ] || { tail -20 $state/$name.log; echo "error: $name did not finish"; failed=1; continue; }
  rm -rf $ex && python3 -m dualrl.export $run $ex/$name --weights ema --dtype float16 | tail -1 \
    || { echo "error: export of $name failed"; failed=1; continue; }
  cp $run/metrics.jsonl $run/recipe.yaml $run/summary.json $state/$name.log $ex/
  tar -C $ex -cf /tmp/$name.tar . && split -b 15M /tmp/$name.tar $OUT/$name.tar.part
done < $state/specs
ls -la $OUT
exit $failed
