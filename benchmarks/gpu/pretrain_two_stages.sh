#!/usr/bin/env bash
# Pretrain tiny-model variants in two stages in one device call, side by side on the one GPU: stage 1 from random
# init (recipes/pretrain_tiny.yaml with the variant's overrides), its EMA exported, then stage 2 from that export
# at lr 3e-4 with a fresh optimizer and schedule (the schedule that made recipes/pretrained/shapes-tiny-wide). Each
# stage ends at its step count or at its minutes (`train.max_minutes`), whichever comes first; each evaluates on
# the 256 held-out `val` regions. Stage 2's EMA export, with both stages' metrics, recipes and logs, comes back as
# $OUT/NAME.tar, split into 15 MB parts (join: cat NAME.tar.part* > NAME.tar). DEVICE=cpu checks it on a CPU.
#   bash benchmarks/gpu/pretrain_two_stages.sh S1_STEPS S1_MINUTES S2_STEPS S2_MINUTES NAME=key=value[,key=value...] ...
set -u -o pipefail
[ $# -ge 5 ] || { echo "usage: $0 S1_STEPS S1_MINUTES S2_STEPS S2_MINUTES NAME=overrides ..."; exit 2; }
s1_steps=$1 s1_min=$2 s2_steps=$3 s2_min=$4
shift 4
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "${DEVICE:-cuda}" = cuda ]; then source benchmarks/gpu/setup.sh || exit 1; fi
root=/tmp/p2
rm -rf $root
mkdir -p $root
common="train.device=${DEVICE:-cuda} data.num_workers=${WORKERS:-6} wandb.mode=disabled train.log_every=100"
stage() {  # stage number, steps, minutes, extra overrides: every variant side by side
  local n=$1 steps=$2 minutes=$3 extra=$4 spec name args pids=()
  shift 4
  for spec in "$@"; do
    name=${spec%%=*}
    args=${spec#*=}
    args=${args//,/ }
    # shellcheck disable=SC2086  # the overrides are words
    python3 -m dualrl.launch recipes/pretrain_tiny.yaml $args $common ${extra//@/$root/$name} train.steps="$steps" \
      train.max_minutes="$minutes" eval.every=$((steps / 2)) train.save_every=$((steps / 2)) \
      output_dir=$root/$name/s$n >$root/$name/s$n.log 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || echo "error: a stage-$n run failed (exit $?)"; done
  for spec in "$@"; do
    name=${spec%%=*}
    echo "== $name stage $n: $(tr '\r' '\n' <$root/"$name"/s$n.log | grep -h -o "eval at step [0-9]*: {[^}]*}" | tail -2 \
      | cut -c1-120 | tr '\n' ' ')"
    python3 -m dualrl.export $root/"$name"/s$n $root/"$name"/s${n}_export --weights ema --dtype float16 | tail -1
  done
}
for spec in "$@"; do mkdir -p $root/"${spec%%=*}"; done
stage 1 "$s1_steps" "$s1_min" "" "$@"
stage 2 "$s2_steps" "$s2_min" "model.pretrained=@/s1_export optim.lr=3e-4" "$@"
failed=0
for spec in "$@"; do
  name=${spec%%=*}
  keep=/tmp/keep_$name
  rm -rf $keep && mkdir -p $keep/metrics
  cp -r $root/"$name"/s2_export $keep/"$name" || { echo "error: $name has no stage-2 export"; failed=1; continue; }
  for n in 1 2; do
    cp $root/"$name"/s$n/{metrics.jsonl,recipe.yaml,summary.json} $keep/metrics/ 2>/dev/null
    for f in metrics.jsonl recipe.yaml summary.json; do
      [ -f $keep/metrics/$f ] && mv $keep/metrics/$f $keep/metrics/s${n}_$f
    done
    tr '\r' '\n' <$root/"$name"/s$n.log | grep -v "it/s\]" >$keep/metrics/s$n.log
  done
  tar -C $keep -cf /tmp/"$name".tar . && split -b 15M /tmp/"$name".tar "$OUT/$name.tar.part"
done
ls -la "$OUT"
exit $failed
