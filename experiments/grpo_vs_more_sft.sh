#!/usr/bin/env bash
# What GRPO adds after sft_dual: grpo_dual from each sft_dual_seedS run's EMA weights, against sft_dual continued
# from the same weights for the same wall time (its steps: 300 x grpo's wall time / the median wall time of the
# sft_dual runs). Needs experiments/sft_dual_vs_supervised.sh's runs in $OUT. Run it alone: wall times set the
# step counts.
#   bash experiments/grpo_vs_more_sft.sh [OUT=outputs/compare] [SEEDS="0 1 2"] [EXTRA="key=value ..."]
#       [RECIPE=recipes/sft_dual.yaml] [GRPO_RECIPE=recipes/grpo_dual.yaml]
set -euo pipefail
OUT=${OUT:-outputs/compare}
SEEDS=${SEEDS:-0 1 2}
RECIPE=${RECIPE:-recipes/sft_dual.yaml}
GRPO_RECIPE=${GRPO_RECIPE:-recipes/grpo_dual.yaml}
read -r -a EXTRA <<<"${EXTRA:-}"  # overrides for every arm, e.g. eval.split=select to choose settings
wall() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['wall_time_s'])" "$1/summary.json"; }
sft_wall=$(python -c "import json,statistics,sys; print(statistics.median(json.load(open(f + '/summary.json'))['wall_time_s'] for f in sys.argv[1:]))" "$OUT"/sft_dual_seed*/)
launch() {  # output_dir, recipe, overrides...
  local dir=$1
  shift
  [ -f "$dir/summary.json" ] && { echo "$dir: done before, kept"; return; }
  local start=$SECONDS
  python -m dualrl.launch "$@" output_dir="$dir" >"$dir.log" 2>&1 || { echo "$dir: failed, see $dir.log" >&2; exit 1; }
  echo "$dir: $((SECONDS - start)) s"
}
for seed in $SEEDS; do
  base=$OUT/sft_dual_seed$seed
  [ -f "$base/summary.json" ] || { echo "$base: missing; run experiments/sft_dual_vs_supervised.sh first" >&2; exit 1; }
  common=(train.seed=$seed data.seed=$seed model.seed=$seed wandb.mode=disabled ${EXTRA[@]+"${EXTRA[@]}"} model.init_from=$base
          model.init_weights=ema)
  launch "$OUT/grpo_dual_seed$seed" "$GRPO_RECIPE" "${common[@]}"
  steps=$(python -c "import sys; print(round(300 * float(sys.argv[1]) / float(sys.argv[2])))" \
    "$(wall "$OUT/grpo_dual_seed$seed")" "$sft_wall")
  launch "$OUT/more_sft_dual_seed$seed" "$RECIPE" "${common[@]}" train.steps="$steps"
done
python -m dualrl.plot "$OUT"/grpo_dual_seed*/ "$OUT"/more_sft_dual_seed*/ --out "$OUT/grpo_vs_more_sft.png" \
  --metrics eval/cycle_miou eval/ref_miou eval/meteor \
  --json "$OUT/grpo_vs_more_sft.json" --title "grpo_dual against sft_dual continued for the same wall time"
