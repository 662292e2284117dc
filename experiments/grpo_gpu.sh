#!/usr/bin/env bash
# The GRPO experiments of the tiny models on one GPU, through experiments/gpu_runs.sh (runs side by side, logs back
# as $OUT/runs.tar.gz). Each stage fits one device call of 10 minutes; carry .whl and .gpucarry.
#   bash experiments/grpo_gpu.sh select   # settings on the select split: one sft_dual start (seed 0), then GRPO
#                                          # arms (lr, seg_target, G, temperature)
#   bash experiments/grpo_gpu.sh val      # the GRPO recipe against sft_dual continued, from 3 seeds' sft_dual EMA
# The recipes are the wide model's unless S (sft_dual) and G (grpo) name others, as for the default size:
#   S=recipes/sft_dual.yaml G=recipes/grpo_dual.yaml MORE_STEPS=400 bash experiments/grpo_gpu.sh val
# WAVE1 / WAVE2: the seconds of the sft_dual wave and of the continuation wave; EXTRA: overrides (commas) for every
# continuation run, e.g. EXTRA=eval.every=50, so that the continued arm has an evaluation near GRPO's wall time.
# The arms of one wave share the machine, so their step times are those of runs side by side, not of a run alone.
set -u
S=${S:-recipes/sft_dual_wide.yaml}
G=${G:-recipes/grpo_dual_wide.yaml}
W1=${WAVE1:-120}
W2=${WAVE2:-420}
X=${EXTRA:+,$EXTRA}
seed() { echo "train.seed=$1,data.seed=$1,model.seed=$1"; }
case ${1:-} in
  select)
    # the recipe's GRPO block as it was before this sweep (temperature 1, seg_target reference), then one change each
    g="$G,model.init_from=@sft0,model.init_weights=ema,eval.split=select,$(seed 0),algo.grpo.temperature=1.0"
    g="$g,algo.grpo.seg_target=reference,train.steps=${STEPS:-300},eval.every=$((${STEPS:-300} / 2))"
    bash experiments/gpu_runs.sh "$W1" sft0="$S,$(seed 0)" -- "$W2" \
      base="$g" lr1e-4="$g,optim.lr=1e-4" lr3e-4="$g,optim.lr=3e-4" \
      lr1e-4_best="$g,optim.lr=1e-4,algo.grpo.seg_target=best" lr1e-4_g16="$g,optim.lr=1e-4,algo.grpo.num_generations=16" \
      t15="$g,algo.grpo.temperature=1.5" t2_lr1e-4="$g,algo.grpo.temperature=2.0,optim.lr=1e-4" \
      t15_best="$g,algo.grpo.temperature=1.5,algo.grpo.seg_target=best"
    ;;
  val)
    c=model.init_weights=ema$X
    bash experiments/gpu_runs.sh "$W1" sft0="$S,$(seed 0)" sft1="$S,$(seed 1)" sft2="$S,$(seed 2)" -- "$W2" \
      grpo0="$G,model.init_from=@sft0,$c,$(seed 0)" grpo1="$G,model.init_from=@sft1,$c,$(seed 1)" \
      grpo2="$G,model.init_from=@sft2,$c,$(seed 2)" more0="$S,model.init_from=@sft0,$c,$(seed 0),train.steps=${MORE_STEPS:-420}" \
      more1="$S,model.init_from=@sft1,$c,$(seed 1),train.steps=${MORE_STEPS:-420}" \
      more2="$S,model.init_from=@sft2,$c,$(seed 2),train.steps=${MORE_STEPS:-420}"
    ;;
  *) echo "usage: $0 select|val" >&2; exit 2 ;;
esac
