#!/usr/bin/env bash
# What the dual loop adds: the default sft_dual run against the same run with only its supervised terms
# (referring segmentation + captioning of the regions that have an expression: algo.name=pretrain with sft_dual's
# weights), same steps, data and seeds. Each seed sets the data order, the step generators and the LoRA init.
#   bash experiments/sft_dual_vs_supervised.sh [OUT=outputs/compare] [SEEDS="0 1 2"] [EXTRA="key=value ..."] [RECIPE=recipes/sft_dual.yaml]
#       [CONTROL=supervised CONTROL_EXTRA="key=value ..."]  (another control: its run name and its own overrides,
#       e.g. CONTROL=clicks CONTROL_EXTRA="algo.pretrain.point_weight=1.0 algo.pretrain.point_regions=all")
# A run already in $OUT (its summary.json) is kept, so give another control its own CONTROL name.
# It ends with: python -m dualrl.plot $OUT/sft_dual_seed*/ $OUT/${CONTROL}_seed*/ --out $OUT/sft_dual_vs_$CONTROL.png
set -euo pipefail
OUT=${OUT:-outputs/compare}
SEEDS=${SEEDS:-0 1 2}
RECIPE=${RECIPE:-recipes/sft_dual.yaml}
read -r -a EXTRA <<<"${EXTRA:-}"  # overrides for every arm, e.g. eval.split=select to choose settings
CONTROL=${CONTROL:-supervised}
read -r -a CONTROL_EXTRA <<<"${CONTROL_EXTRA:-}"
mkdir -p "$OUT"
supervised=(algo.name=pretrain algo.pretrain.ref_weight=1.0 algo.pretrain.caption_weight=0.5
            algo.pretrain.point_weight=0.0)
for seed in $SEEDS; do
  common=(train.seed=$seed data.seed=$seed model.seed=$seed wandb.mode=disabled ${EXTRA[@]+"${EXTRA[@]}"})
  for arm in sft_dual "$CONTROL"; do
    dir=$OUT/${arm}_seed$seed
    [ -f "$dir/summary.json" ] && { echo "$dir: done before, kept"; continue; }
    extra=()
    [ "$arm" = "$CONTROL" ] && extra=("${supervised[@]}" ${CONTROL_EXTRA[@]+"${CONTROL_EXTRA[@]}"})
    start=$SECONDS
    python -m dualrl.launch "$RECIPE" output_dir="$dir" "${common[@]}" "${extra[@]}" >"$dir.log" 2>&1 \
      || { echo "$dir: failed, see $dir.log" >&2; exit 1; }
    echo "$dir: $((SECONDS - start)) s"
  done
done
python -m dualrl.plot "$OUT"/sft_dual_seed*/ "$OUT"/"$CONTROL"_seed*/ --out "$OUT/sft_dual_vs_$CONTROL.png" \
  --json "$OUT/sft_dual_vs_$CONTROL.json" --title "sft_dual against its control ($CONTROL)"
