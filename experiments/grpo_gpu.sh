#!/usr/bin/env bash
# The GRPO experiments of the tiny models on one GPU, through experiments/gpu_runs.sh (runs side by side, logs back
# as $OUT/runs.tar.gz). Each stage fits one device call of 10 minutes; carry .whl and .gpucarry.
#   bash experiments/grpo_gpu.sh select   # settings on the select split: one sft_dual start (seed 0), then GRPO
#                                          # arms (lr, seg_target, G, temperature)
#   bash experiments/grpo_gpu.sh val      # the GRPO recipe against sft_dual continued, from 3 seeds' sft_dual EMA
#   S=recipes/sft_dual.yaml G=recipes/grpo_dual.yaml bash experiments/grpo_gpu.sh greedy   # as select, the greedy
#                                          # caption as the baseline (algo.grpo.baseline=greedy) beside the recipe
#   S=... G=... bash experiments/grpo_gpu.sh pure   # GRPO alone on the shared LoRA (no segmenter terms), against a
#                                          # frozen teacher: does the segmenter's loss pull the greedy captions down?
#   S=... G=... bash experiments/grpo_gpu.sh credit   # the greedy baseline's advantage only on the tokens from where
#                                          # a sample leaves the greedy caption (algo.grpo.credit=after_greedy_prefix)
#   S=... G=... bash experiments/grpo_gpu.sh strong   # the arms that came closest on the former checkpoint, again
#                                          # from the strong one (recipes/pretrained/shapes-tiny since 2026-12-04)
# The three stages below start from sft_dual seed 0's EMA made elsewhere (on the CPU: experiments/
# sft_dual_vs_supervised.sh), as STARTS/seed0/step_300/ema.safetensors (17 MB; an empty trainable.safetensors beside
# it marks the step folder). With the tree it does not fit one call's carry beside .whl and WordNet: a first call
# carries it and .gpucarry/wordnet.tar.xz and copies both to /tmp/keep, a second one right after (the machine
# still warm) carries .whl and runs with STARTS=/tmp/keep/starts, having copied the WordNet back into .gpucarry/.
#   STARTS=.gpucarry/starts bash experiments/grpo_gpu.sh teacher   # teacher and sampling arms on select, seed 0
#   STARTS=.gpucarry/starts bash experiments/grpo_gpu.sh batch     # larger batches and learning rates, frozen teacher
#   STARTS=.gpucarry/starts bash experiments/grpo_gpu.sh long      # three arms for as many steps as the wave allows
#   STARTS=.gpucarry/starts bash experiments/grpo_gpu.sh winners   # the winners' likelihood term (best_weight), RAFT
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
# GRPO from sft0, made in the call's first wave (select split, seed 0), and that first wave before the arms given
from_sft0() {
  local steps=${STEPS:-300}
  echo "$G,model.init_from=@sft0,model.init_weights=ema,eval.split=select,$(seed 0),train.steps=$steps,eval.every=${EVERY:-100}"
}
after_sft0() { bash experiments/gpu_runs.sh "$W1" sft0="$S,$(seed 0)" -- "$W2" "$@"; }
# GRPO from the carried start of seed 0, evaluated on select (the teacher, batch and long stages)
from_seed0() { echo "$G,model.init_from=$STARTS/seed0/step_300,model.init_weights=ema,eval.split=select,$(seed 0)"; }
case ${1:-} in
  select)
    # the recipe's GRPO block as it was before this sweep (temperature 1, seg_target reference), then one change each
    g="$G,model.init_from=@sft0,model.init_weights=ema,eval.split=select,$(seed 0),algo.grpo.temperature=1.0"
    g="$g,algo.grpo.seg_target=reference,train.steps=${STEPS:-300},eval.every=$((${STEPS:-300} / 2))"
    after_sft0 \
      base="$g" lr1e-4="$g,optim.lr=1e-4" lr3e-4="$g,optim.lr=3e-4" \
      lr1e-4_best="$g,optim.lr=1e-4,algo.grpo.seg_target=best" lr1e-4_g16="$g,optim.lr=1e-4,algo.grpo.num_generations=16" \
      t15="$g,algo.grpo.temperature=1.5" t2_lr1e-4="$g,algo.grpo.temperature=2.0,optim.lr=1e-4" \
      t15_best="$g,algo.grpo.temperature=1.5,algo.grpo.seg_target=best"
    ;;
  greedy)
    # the recipe's GRPO block, then the greedy baseline with it and with one change each (select split, seed 0)
    g="$(from_sft0)"
    r="$g,algo.grpo.baseline=greedy"
    after_sft0 recipe="$g" greedy="$r" \
      greedy_t15="$r,algo.grpo.temperature=1.5" greedy_frozen="$r,algo.ema_decay=1.0" \
      greedy_lr3e-5="$r,optim.lr=3e-5" greedy_b16_lr3e-4="$r,data.batch_size=16,optim.lr=3e-4" \
      greedy_unscaled="$r,algo.grpo.scale_rewards=none"
    ;;
  pure)
    g="$(from_sft0),algo.ema_decay=1.0"
    p="$g,algo.grpo.seg_weight=0,algo.loss.llm_weight=0"
    q="$p,algo.grpo.baseline=greedy"
    after_sft0 frozen="$g" frozen_greedy="$g,algo.grpo.baseline=greedy" \
      pure="$p" pure_greedy="$q" pure_greedy_lr3e-5="$q,optim.lr=3e-5" pure_greedy_t15="$q,algo.grpo.temperature=1.5" \
      pure_greedy_b16="$q,data.batch_size=16" pure_greedy_winners="$q,algo.grpo.best_weight=1.0"
    ;;
  credit)
    g="$(from_sft0)"
    c="$g,algo.grpo.baseline=greedy,algo.grpo.credit=after_greedy_prefix"
    f="$c,algo.ema_decay=1.0"
    p="$f,algo.grpo.seg_weight=0,algo.loss.llm_weight=0"
    after_sft0 recipe="$g" credit="$c" credit_frozen="$f" \
      credit_frozen_lr3e-4="$f,optim.lr=3e-4" credit_frozen_t15="$f,algo.grpo.temperature=1.5" \
      credit_frozen_b16="$f,data.batch_size=16" credit_alone="$p" credit_alone_lr3e-4="$p,optim.lr=3e-4"
    ;;
  strong)
    g="$(from_sft0)"
    r="$g,algo.grpo.baseline=greedy"
    f="$g,algo.ema_decay=1.0,algo.grpo.temperature=1.5"
    after_sft0 recipe="$g" greedy="$r" \
      greedy_frozen="$r,algo.ema_decay=1.0" lr3e-5="$g,optim.lr=3e-5" t15="$g,algo.grpo.temperature=1.5" \
      frozen_t15_b16_lr3e-4="$f,data.batch_size=16,optim.lr=3e-4" frozen_best1="$g,algo.ema_decay=1.0,algo.grpo.best_weight=1.0" \
      pure_greedy="$r,algo.ema_decay=1.0,algo.grpo.seg_weight=0,algo.loss.llm_weight=0"
    ;;
  val)
    c=model.init_weights=ema$X
    bash experiments/gpu_runs.sh "$W1" sft0="$S,$(seed 0)" sft1="$S,$(seed 1)" sft2="$S,$(seed 2)" -- "$W2" \
      grpo0="$G,model.init_from=@sft0,$c,$(seed 0)" grpo1="$G,model.init_from=@sft1,$c,$(seed 1)" \
      grpo2="$G,model.init_from=@sft2,$c,$(seed 2)" more0="$S,model.init_from=@sft0,$c,$(seed 0),train.steps=${MORE_STEPS:-420}" \
      more1="$S,model.init_from=@sft1,$c,$(seed 1),train.steps=${MORE_STEPS:-420}" \
      more2="$S,model.init_from=@sft2,$c,$(seed 2),train.steps=${MORE_STEPS:-420}"
    ;;
  teacher)
    g="$(from_seed0)"
    g="$g,train.steps=${STEPS:-300},eval.every=100"
    f="$g,algo.ema_decay=1.0,algo.grpo.temperature=1.5"
    bash experiments/gpu_runs.sh "$W2" base="$g" frozen="$g,algo.ema_decay=1.0" t15="$g,algo.grpo.temperature=1.5" \
      frozen_t15="$f" frozen_t15_b8="$f,data.batch_size=8" frozen_t15_best="$f,algo.grpo.seg_target=best" \
      frozen_t15_it2="$f,algo.grpo.num_iterations=2,algo.grpo.epsilon_high=0.28" \
      frozen_t15_g16="$f,algo.grpo.num_generations=16"
    ;;
  batch)
    h="$(from_seed0)"
    h="$h,train.steps=${STEPS:-300},eval.every=100,algo.ema_decay=1.0"
    b="$h,data.batch_size=16,algo.grpo.temperature=1.5"
    bash experiments/gpu_runs.sh "$W2" b16_lr3e-4="$h,data.batch_size=16,optim.lr=3e-4" \
      b16_lr3e-4_t15="$b,optim.lr=3e-4" b16_lr1e-4_t15="$b,optim.lr=1e-4" \
      b16_lr3e-4_t15_soft="$b,optim.lr=3e-4,rewards.0.soft=true" b16_lr3e-4_t15_kl="$b,optim.lr=3e-4,algo.grpo.beta=0.04" \
      b32_lr3e-4_t15="$b,optim.lr=3e-4,data.batch_size=32" ema999_b16_lr3e-4_t15="$b,optim.lr=3e-4,algo.ema_decay=0.999" \
      b16_lr1e-3_t15_kl="$b,optim.lr=1e-3,algo.grpo.beta=0.04"
    ;;
  long)
    h="$(from_seed0)"
    h="$h,train.steps=${STEPS:-1000},eval.every=${EVERY:-200}"
    bash experiments/gpu_runs.sh "$W2" recipe="$h" frozen_t15="$h,algo.ema_decay=1.0,algo.grpo.temperature=1.5" \
      frozen_t15_b16_lr3e-4="$h,algo.ema_decay=1.0,algo.grpo.temperature=1.5,data.batch_size=16,optim.lr=3e-4"
    ;;
  winners)
    # the likelihood term on each group's best caption (algo.grpo.best_weight), beside GRPO and alone (RAFT)
    h="$(from_seed0)"
    h="$h,train.steps=${STEPS:-1000},eval.every=${EVERY:-100}"
    f="$h,algo.ema_decay=1.0"
    w="$f,data.batch_size=16,optim.lr=3e-4"
    bash experiments/gpu_runs.sh "$W2" lead="$w,algo.grpo.temperature=1.5" \
      lead_best1="$w,algo.grpo.temperature=1.5,algo.grpo.best_weight=1.0" b16_best1="$w,algo.grpo.best_weight=1.0" \
      b16_raft="$w,algo.grpo.policy_weight=0.0,algo.grpo.best_weight=1.0" \
      b16_raft_lr1e-4="$f,data.batch_size=16,optim.lr=1e-4,algo.grpo.policy_weight=0.0,algo.grpo.best_weight=1.0" \
      recipe_best1="$h,algo.grpo.best_weight=1.0" frozen_best1="$f,algo.grpo.best_weight=1.0" \
      frozen_raft="$f,algo.grpo.policy_weight=0.0,algo.grpo.best_weight=1.0"
    ;;
  *) echo "usage: $0 select|greedy|pure|credit|strong|val|teacher|batch|long|winners" >&2; exit 2 ;;
esac
