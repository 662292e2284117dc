#!/usr/bin/env bash
# Run several `dualrl.launch` jobs side by side on the GPU machine, in waves (a wave starts when the one before has
# ended), and bring back what each run logged: its metrics, summary, resolved recipe and log, as NAME/ folders in
# one archive, $OUT/runs.tar.gz (the device returns few files). Checkpoints stay on the machine for later waves.
# A tiny model leaves an H200 mostly idle, so runs sharing it barely slow each other; the machine's 16 cores make
# the scenes.
#   bash experiments/gpu_runs.sh WAVE_S NAME=RECIPE[,key=value...] ... [-- WAVE_S NAME=RECIPE[,...] ...]
# `@NAME` in a value is that run's output folder (model.init_from=@sft0 continues run sft0's weights). Each wave has
# its WAVE_S seconds; a run still going then is stopped and reported, and the script exits non-zero.
# The machine has no WordNet: carry .gpucarry (benchmarks/gpu/setup.sh says how to make it).
set -u -o pipefail
OUT=${OUT:-/tmp/out}
runs=/tmp/gpu_runs
wave_s=$1
shift
logs=/tmp/gpu_runs_logs
mkdir -p "$OUT" $runs $logs
[ -f .gpucarry/wordnet.tar.xz ] || { echo "error: .gpucarry/wordnet.tar.xz missing (carry it)"; exit 1; }
source benchmarks/gpu/setup.sh || exit 1
failed=0
start_wave() {
  local pids=() names=() spec name args
  for spec in "$@"; do
    name=${spec%%=*}
    args=${spec#*=}
    args=${args//,/ }
    args=${args//@/$runs/}
    # shellcheck disable=SC2086  # the overrides are words
    timeout "$wave_s" python3 -m dualrl.launch $args train.device=cuda data.num_workers=2 wandb.mode=disabled \
      output_dir=$runs/"$name" >$runs/"$name".log 2>&1 &
    pids+=($!)
    names+=("$name")
  done
  local i ok
  for i in "${!pids[@]}"; do
    name=${names[$i]}
    ok=1
    wait "${pids[$i]}" || { echo "error: $name failed (exit $?)"; ok=0; failed=1; }
    mkdir -p $logs/"$name"
    cp $runs/"$name"/{metrics.jsonl,summary.json,recipe.yaml} $logs/"$name"/ 2>/dev/null
    tr '\r' '\n' <$runs/"$name".log | sed -E 's/^[a-z_]+: +[0-9]+%\|[^]]*\]//' | grep -v '^$' >$logs/"$name"/run.log
    echo "$name: $(grep -h -o "eval at step [0-9]*: {[^}]*}" $logs/"$name"/run.log | tail -1 | cut -c1-160)"
    [ $ok = 1 ] || tail -5 $logs/"$name"/run.log
  done
}
wave=()
next_is_time=0
for arg in "$@"; do
  if [ "$arg" = -- ]; then
    start_wave "${wave[@]}"
    wave=()
    next_is_time=1
  elif [ $next_is_time = 1 ]; then
    wave_s=$arg
    next_is_time=0
  else
    wave+=("$arg")
  fi
done
[ ${#wave[@]} = 0 ] || start_wave "${wave[@]}"
tar -C $logs -czf "$OUT/runs.tar.gz" . || failed=1
exit $failed
