#!/usr/bin/env bash
# Issue 11's GPU measurements, in stages that fit one device call each (logs and JSON under $OUT):
#   bash benchmarks/gpu/issue11.sh rollout   # engine vs engine_compiled at the 4B grpo shape, profile of the compiled step
#   bash benchmarks/gpu/issue11.sh decode    # decode attention kernels; engine, compiled layers, fused projections
#   bash benchmarks/gpu/issue11.sh learner   # sft_dual's learner at the 4B recipe's batch: micro-batches and recomputation
#   bash benchmarks/gpu/issue11.sh learner_compiled  # the same with model.train_compile, profiled by kernel kind
#   ALGO=sft_dual|grpo bash benchmarks/gpu/issue11.sh token_rows  # learner_compiled's update, PEFT's token rows vs dualrl's
#   ALGO=sft_dual|grpo bash benchmarks/gpu/issue11.sh wrapper  # learner_compiled with inductor's C++ wrapper, then
#                                            # the Python wrapper against the C++ one on one batch, alternating
#   bash benchmarks/gpu/issue11.sh probe     # inductor's C++ wrapper builds and trains on this machine (seconds)
#   bash benchmarks/gpu/issue11.sh tiny_graphs  # the CUDA-graph test; the tiny step eager, with model.train_graphs, eager;
#                                            # the training loop with them
#   bash benchmarks/gpu/issue11.sh tiny_precision  # the graphed tiny step in float32, TF32, bf16; its loop in TF32
#   bash benchmarks/gpu/issue11.sh tiny_host  # the graphed tiny step against an earlier tree's; its loop
#   bash benchmarks/gpu/issue11.sh sft_mfu   # 4B sft_dual MFU over new batches, each with its FLOPs; expandable segments
#   bash benchmarks/gpu/issue11.sh tiny_loop_matrix  # the graphed tiny loop: chunks, threads, workers, bf16, by thread
#   bash benchmarks/gpu/issue11.sh tiny_final  # the tiny loop with the GPU defaults, their parts off in turn; the recipe run
#   bash benchmarks/gpu/issue11.sh tiny_ledger  # GPU tests of the ledger; the tiny loop reading every step against
#                                            # reading every train.log_every steps; the recipe through the driver
#   bash benchmarks/gpu/issue11.sh ledger_final  # tiny_ledger's tests, loops and recipe run, then sft_mfu's first run
#   bash benchmarks/gpu/issue11.sh pin_final  # GPU tests; the tiny loop unpinned / pinned / unpinned; the recipe
#                                            # through the driver; the 4B sft_dual MFU
#   bash benchmarks/gpu/issue11.sh host_final  # GPU tests; the recipe's steady steps/s through the driver; the 4B
#                                            # sft_dual MFU, its update at 1 and 16 threads, region cells two ways
#   bash benchmarks/gpu/issue11.sh final_a   # rollout against generate; the tiny loop; the tiny recipe through the driver
#   bash benchmarks/gpu/issue11.sh final_b   # both algorithms' whole steps and MFU (141 GB settings) against the naive loop
#   bash benchmarks/gpu/issue11.sh final_c   # the 4B sft_dual updates on new batches, then replayed; grpo's whole step
#   bash benchmarks/gpu/issue11.sh alloc     # final_c's sft_dual updates under caching-allocator settings, one process each
#   ALGO=sft_dual|grpo bash benchmarks/gpu/issue11.sh steady  # the 4B MFU over updates after ${WARMUP:-16}
#                                            # warm-up steps (a long run's steady state: shapes and allocator seen),
#                                            # each with its own FLOPs, under torch's allocator, then expandable segments
#                                            # (CONFS); SETS: more recipe overrides, TAG: a name for them in the outputs
#   bash benchmarks/gpu/issue11.sh fused     # the 4B sft_dual learner as in steady (fewer steps), then its timed
#                                            # updates again with the LLM's sibling projections one by one and grouped
#   bash benchmarks/gpu/issue11.sh gc        # the grouped loop: each update's time in Python's collector, a full
#                                            # collection's cost
#   bash benchmarks/gpu/issue11.sh gc_tiny   # pretrain_tiny through the driver: steps/s, the collector's time a step
#   bash benchmarks/gpu/issue11.sh gaps      # the 4B sft_dual learner as in steady (${STEPS:-12} steps), then the last
#                                            # batch's update under the profiler: where the GPU waits, and for what
#   bash benchmarks/gpu/issue11.sh encodings # the 4B updates in 2 micro-batches: the teacher's encoding reused or not
#   bash benchmarks/gpu/issue11.sh checks    # CUDA-only tests, the host waits left in eager updates, the tiny step
#   bash benchmarks/gpu/issue11.sh whole     # both algorithms' whole steps against the naive loop, MFU
#   bash benchmarks/gpu/issue11.sh compile_tiny|compile_sft|compile_grpo   # model.train_compile against eager
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu/setup.sh
run() {  # name, seconds, command...: one benchmark, its log under $OUT, never past its deadline
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after ${SECONDS}s"
  tail -n 12 "$OUT/$name.log"
}
steps=benchmarks/gpu/sa2va_steps.py
recipe_run() {  # steps, seconds[, name, overrides...]: recipes/pretrain_tiny.yaml through the driver (12 workers,
  # evaluations at step 0 and at the end), its summary and metrics under $OUT, and its steps/s (batch 64) over the
  # loop (the evaluation at step 0 and the build left out; the last evaluation and the checkpoint in)
  local steps=$1 limit=$2 name=${3:-pretrain_tiny_run}
  shift $(($# < 3 ? $# : 3))
  rm -rf /tmp/pretrain_tiny_run  # a run left there would be resumed
  run "$name" "$limit" python3 -m dualrl.launch recipes/pretrain_tiny.yaml train.device=cuda \
    data.num_workers=12 train.steps="$steps" eval.every="$steps" train.save_every="$steps" train.log_every=100 \
    output_dir=/tmp/pretrain_tiny_run "$@"
  cp /tmp/pretrain_tiny_run/summary.json "$OUT/${name}_summary.json"
  cp /tmp/pretrain_tiny_run/metrics.jsonl "$OUT/${name}_metrics.jsonl"
  python3 -c "import json; s = json.load(open('$OUT/${name}_summary.json')); \
print('$name:', s['steps_this_run'], 'steps,', round(s['samples_per_s'] / 64, 2), 'steps/s (batch 64) over \
the loop, the last evaluation and save included;', round(s['wall_time_s'], 1), 's in all; final', \
s['final'])"
  python3 -c "import json, statistics; m = [json.loads(l) for l in open('$OUT/${name}_metrics.jsonl')]; \
m = [x for x in m if 'step/mean/ms' in x][1:]; w = [x['step/mean/ms'] for x in m]; \
g = [x.get('step/gc/ms', float('nan')) for x in m]; \
print('$name: steady', round(1000 / statistics.median(w), 2), 'steps/s (median step/mean/ms of', len(w), \
'windows after the first:', round(statistics.median(w), 2), 'ms; range', round(min(w), 2), '-', round(max(w), 2), \
'); in the collector', round(statistics.median(g), 3), 'ms a step (median; range', round(min(g), 3), '-', \
round(max(g), 3), ')')"
}
tiny_loops() {  # "label [tiny_steps options]"...: the graphed tiny loop (12 workers), one process each, in turn
  local i=0 spec label extra
  for spec in "$@"; do
    read -r label extra <<<"$spec"
    i=$((i + 1))
    # shellcheck disable=SC2086  # the overrides are words
    run "loop_${i}_$label" 70 python3 benchmarks/gpu/tiny_steps.py model.train_graphs=true $extra --only loop \
      --max-seconds "${SECONDS_EACH:-20}" --loop-steps 1000 --loop-workers 12 --out "$OUT/loop_${i}_$label.json"
  done
}
sft_mfu_left() {  # default budget, [sa2va_steps options]: the 4B sft_dual MFU over 7 new batches, each with its own
  # FLOPs, in what is left of ${BUDGET:-$1} s
  local left=$((${BUDGET:-$1} - SECONDS))
  shift
  echo "== ${left}s left for sft_mfu"
  run sft_mfu "$left" python3 $steps --algos sft_dual --batch-size 8 --accumulation 1 --steps 8 --flops-each "$@" \
    --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp \
    --out "$OUT/sft_mfu.json"
}
case ${1:-} in
  rollout)
    run rollout 330 python3 benchmarks/gpu/rollout.py --paths engine engine_compiled --steps 8 --profile \
      --profile-path engine_compiled --out "$OUT/rollout.json"
    run sdpa_shapes 60 python3 benchmarks/gpu/sdpa_shapes.py --out "$OUT/sdpa_shapes.json"
    ;;
  decode)
    run decode_attention 90 python3 benchmarks/gpu/decode_attention.py --out "$OUT/decode_attention.json"
    run rollout_fused 420 python3 benchmarks/gpu/rollout.py \
      --paths engine engine_compiled engine_fused --steps 8 \
      --profile --profile-path engine_fused --out "$OUT/rollout_fused.json"
    ;;
  learner)  # one micro-batch, no recomputation (what H200-class memory allows), with a profile of one update
    run sft_acc1_norecompute 240 python3 $steps --algos sft_dual --batch-size 8 --accumulation 1 --steps 4 \
      --set model.gradient_checkpointing=false --profile-learner --out "$OUT/sft_acc1_norecompute.json"
    run grpo_acc1_norecompute 200 python3 $steps --algos grpo --batch-size 4 --generations 8 --accumulation 1 \
      --steps 4 --set model.gradient_checkpointing=false --out "$OUT/grpo_acc1_norecompute.json"
    ;;
  learner_compiled)  # one micro-batch, no recomputation, blocks compiled: MFU, a profile of one update by kernel
    # kind, the whole step against the naive loop on $NAIVE regions (0: not run), then the ops of one eager update
    # that make the host wait, by source line, for $SYNC_ALGOS (a dispatch mode around compiled blocks would
    # compile them again); CUDA's sync debug mode confirms each and gives its stack
    run sft_acc1_compiled 300 python3 $steps --algos sft_dual --batch-size 8 --accumulation 1 --steps 4 \
      --set model.gradient_checkpointing=false model.train_compile=true --profile-learner \
      --naive-regions "${NAIVE:-1}" --out "$OUT/sft_acc1_compiled.json"
    run grpo_acc1_compiled 260 python3 $steps --algos grpo --batch-size 4 --generations 8 --accumulation 1 \
      --steps 4 --set model.gradient_checkpointing=false model.train_compile=true --profile-learner \
      --naive-regions "${NAIVE:-1}" --out "$OUT/grpo_acc1_compiled.json"
    # shellcheck disable=SC2086  # the algorithms are words
    run sync_sites 240 python3 $steps --algos ${SYNC_ALGOS:-sft_dual grpo} --batch-size 4 --generations 8 \
      --accumulation 1 --steps 2 --set model.gradient_checkpointing=false --sync-sites --out "$OUT/sync_sites.json"
    ;;
  token_rows)  # learner_compiled's settings for $ALGO, a profile of one update, then PEFT's token rows against
    # dualrl's (model/token_rows.py) on one batch, alternating, in the same process
    algo=${ALGO:-sft_dual}
    if [ "$algo" = grpo ]; then shape=(--batch-size 4 --generations 8); else shape=(--batch-size 8); fi
    run "${algo}_token_rows" 450 python3 $steps --algos "$algo" "${shape[@]}" --accumulation 1 --steps 4 \
      --set model.gradient_checkpointing=false model.train_compile=true --profile-learner --compare-token-rows \
      --out "$OUT/${algo}_token_rows.json"
    ;;
  probe)  # a compiled MLP's forward and backward with the C++ wrapper on the GPU, against eager
    run cpp_wrapper_probe 240 python3 - <<'PY'
import time, torch
net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
x = torch.randn(64, 256, device="cuda")
def grads(f):
    net.zero_grad()
    f(x).square().mean().backward()
    return [p.grad.clone() for p in net.parameters()]
eager = grads(net)
t = time.perf_counter()
compiled = grads(torch.compile(net._call_impl, dynamic=True, options={"cpp_wrapper": True}))
print(f"cpp wrapper: compiled forward and backward in {time.perf_counter() - t:.1f} s; largest gradient difference",
      max(float((a - b).abs().max()) for a, b in zip(eager, compiled)))
PY
    ;;
  wrapper)  # learner_compiled's settings for $ALGO with the C++ wrapper: timed steps (MFU) and a profile of one
    # update, then the Python wrapper against the C++ one on one batch, alternating, in the same process
    algo=${ALGO:-sft_dual}
    if [ "$algo" = grpo ]; then shape=(--batch-size 4 --generations 8); else shape=(--batch-size 8); fi
    run "${algo}_cpp_wrapper" "${LIMIT:-560}" python3 $steps --algos "$algo" "${shape[@]}" --accumulation 1 --steps 4 \
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp \
      --profile-learner --compare-wrapper --out "$OUT/${algo}_cpp_wrapper.json"
    ;;
  tiny_wrapper)  # pretrain_tiny's learner step at batch 64: eager, compiled with each wrapper, same process
    run tiny_wrapper "${LIMIT:-400}" python3 benchmarks/gpu/tiny_steps.py --only step --steps 100 --warmup 10 --compare-compile \
      --wrappers python cpp --out "$OUT/tiny_wrapper.json"
    ;;
  tiny_graphs)  # pretrain_tiny's learner step at batch 64: eager, with CUDA graphs (model.train_graphs), eager again
    run graph_tests 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_train_graphs.py
    run tiny_graphs "${LIMIT:-300}" python3 benchmarks/gpu/tiny_steps.py --only step --steps 100 --warmup 10 \
      --compare-graphs --out "$OUT/tiny_graphs.json"
    run tiny_graphs_loop "${LIMIT:-200}" python3 benchmarks/gpu/tiny_steps.py model.train_graphs=true --only loop \
      --out "$OUT/tiny_graphs_loop.json"
    ;;
  tiny_precision)  # the graphed tiny step in float32, TF32 and bf16 (one process), a profile of the graphed float32
    # step; then the graphed TF32 loop with the recipe's 6 loader workers and with $WORKERS
    t=benchmarks/gpu/tiny_steps.py
    run tiny_precision "${LIMIT:-240}" python3 $t model.train_graphs=true --only step profile --steps 60 --warmup 10 \
      --variants tf32:model.precision=tf32 bf16:model.precision=bf16 --out "$OUT/tiny_precision.json"
    run tiny_loop_tf32 120 python3 $t model.train_graphs=true model.precision=tf32 --only loop --max-seconds 30 \
      --out "$OUT/tiny_loop_tf32.json"
    run tiny_loop_tf32_w 120 python3 $t model.train_graphs=true model.precision=tf32 --only loop --max-seconds 30 \
      --loop-workers "${WORKERS:-12}" --out "$OUT/tiny_loop_tf32_w.json"
    ;;
  tiny_host)  # the graphed tiny step of this tree against the tree in $BASE (a copy of an earlier commit, e.g.
    # `git archive COMMIT dualrl benchmarks recipes pyproject.toml | tar -x -C .gpucarry/base`), new / base / new,
    # one process each; a Python profile of this tree's step; the loop with $WORKERS workers in each of $PRECISIONS
    t=benchmarks/gpu/tiny_steps.py
    run graph_tests 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_train_graphs.py
    run tiny_new 120 python3 $t model.train_graphs=true --only step pyprofile --steps 100 --warmup 10 --profile-steps 20 \
      --out "$OUT/tiny_new.json"
    (cd "${BASE:-.gpucarry/base}" && run tiny_base 120 python3 $t model.train_graphs=true --only step --steps 100 \
      --warmup 10 --out "$OUT/tiny_base.json")
    run tiny_new_again 120 python3 $t model.train_graphs=true --only step --steps 100 --warmup 10 \
      --out "$OUT/tiny_new_again.json"
    for p in ${PRECISIONS:-float32 tf32}; do
      run "tiny_loop_$p" 100 python3 $t model.train_graphs=true model.precision=$p --only loop --max-seconds 30 \
        --loop-workers "${WORKERS:-12}" --out "$OUT/tiny_loop_$p.json"
    done
    ;;
  sft_mfu)  # the 4B sft_dual update as in `wrapper` (C++ wrapper), 7 timed updates each with its own batch's FLOPs;
    # then the same with the caching allocator's expandable segments (inductor's cache warm from the first run)
    common=(--algos sft_dual --batch-size 8 --accumulation 1 --steps 8 --flops-each
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp)
    run sft_mfu "${LIMIT:-330}" python3 $steps "${common[@]}" --out "$OUT/sft_mfu.json"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run sft_mfu_expandable "${LIMIT:-240}" python3 $steps \
      "${common[@]}" --out "$OUT/sft_mfu_expandable.json"
    ;;
  tiny_loop_matrix)  # which waits for the GPU let other Python threads run; the graphed tiny loop with $WORKERS
    # (12) workers, one process each, in turn: torch's 16 threads (the default before one thread on a GPU), with one
    # sample a message (data.chunk=1), one torch thread, one thread and 6 workers, one thread in bf16, 16 threads
    # again; each with its CPU time by thread
    run gil_waits 60 python3 benchmarks/gpu/gil_waits.py --out "$OUT/gil_waits.json"
    t=benchmarks/gpu/tiny_steps.py
    w=${WORKERS:-12}
    i=0
    for spec in "threads16 train.threads=16" "chunk1 train.threads=16 data.chunk=1" "threads1 train.threads=1" \
      "threads1_w6 train.threads=1 data.num_workers=6" "threads1_bf16 train.threads=1 model.precision=bf16" \
      "threads16_again train.threads=16"; do
      read -r label extra <<<"$spec"
      i=$((i + 1))
      workers=$w
      case $extra in *num_workers=*) workers=${extra##*num_workers=} ;; esac
      # shellcheck disable=SC2086  # the overrides are words
      run "loop_${i}_$label" 80 python3 $t model.train_graphs=true $extra --only loop --max-seconds "${SECONDS_EACH:-25}" \
        --loop-steps 1000 --loop-workers "$workers" --out "$OUT/loop_${i}_$label.json"
    done
    ;;
  tiny_final)  # the graphed tiny loop as the defaults now run it on a GPU (one torch thread, the receiving thread)
    # with 12 workers; without the receiving thread; with the recipe's 6 workers; in bf16; then the recipe itself
    # through the driver (12 workers, $STEPS steps, one evaluation at the end), whose summary gives its steps/s
    t=benchmarks/gpu/tiny_steps.py
    i=0
    for spec in "defaults_w12" "no_receive_thread data.receive_thread=false" "defaults_w6 data.num_workers=6" \
      "bf16_w12 model.precision=bf16"; do
      read -r label extra <<<"$spec"
      i=$((i + 1))
      workers=12
      case $extra in *num_workers=*) workers=${extra##*num_workers=} ;; esac
      # shellcheck disable=SC2086  # the overrides are words
      run "loop_${i}_$label" 80 python3 $t model.train_graphs=true $extra --only loop --max-seconds "${SECONDS_EACH:-25}" \
        --loop-steps 1000 --loop-workers "$workers" --out "$OUT/loop_${i}_$label.json"
    done
    recipe_run "${STEPS:-1500}" 300
    ;;
  tiny_ledger)  # the CUDA-graph test and the ledger's tests on the GPU (fused CUDA AdamW); the graphed tiny loop with
    # 12 workers, one process each: reading every step (as before the ledger), reading every train.log_every steps
    # (the driver's default now), the same in bf16, reading every step again; then the recipe through the driver
    t=benchmarks/gpu/tiny_steps.py
    run gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/model/test_train_graphs.py \
      tests/workers/test_ledger.py tests/algo/test_ema.py
    i=0
    for spec in "read_every_step --read-every 1" "defaults" "bf16 model.precision=bf16" \
      "read_every_step_again --read-every 1"; do
      read -r label extra <<<"$spec"
      i=$((i + 1))
      # shellcheck disable=SC2086  # the overrides are words
      run "loop_${i}_$label" 80 python3 $t model.train_graphs=true $extra --only loop --max-seconds "${SECONDS_EACH:-25}" \
        --loop-steps 1000 --loop-workers 12 --out "$OUT/loop_${i}_$label.json"
    done
    recipe_run "${STEPS:-1200}" 300
    ;;
  ledger_final)  # tiny_ledger's GPU tests; the graphed tiny loop (12 workers) reading every step, reading as the
    # driver does, reading every step again, one process each; the recipe through the driver; then, with what is left of ${BUDGET:-580} s,
    # sft_mfu's first run (the 4B update's MFU) under the one-thread default
    run gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/model/test_train_graphs.py \
      tests/workers/test_ledger.py tests/algo/test_ema.py
    tiny_loops "read_every_step --read-every 1" "defaults" "read_every_step_again --read-every 1"
    recipe_run 1200 150
    sft_mfu_left 580
    ;;
  host_final)  # the GPU tests of the ledger, EMA, graphs and region cells; the recipe through the driver (its steady
    # steps/s from step/mean/ms); then, with what is left of ${BUDGET:-560} s, the 4B sft_dual MFU under the defaults
    # (one torch thread), and its update on one batch at 1 and 16 threads, region cells by block sums and by pooling
    run gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_train_graphs.py \
      tests/workers/test_ledger.py tests/algo/test_ema.py tests/model/test_grounded_vlm.py
    recipe_run 1200 150
    sft_mfu_left 560 --compare-threads 1 16
    ;;
  pin_final)  # the GPU tests of pinned batches, region cells and the ledger; the graphed tiny loop (12 workers) with
    # batches unpinned, pinned (the driver's way), unpinned again, one process each; the recipe through the driver;
    # then, with what is left of ${BUDGET:-560} s, the 4B sft_dual MFU under the defaults
    run gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/data/test_stream.py \
      tests/model/test_grounded_vlm.py tests/workers/test_ledger.py
    tiny_loops "unpinned --unpinned" "pinned" "unpinned_again --unpinned"
    recipe_run 1200 150
    sft_mfu_left 560
    ;;
  final_a)  # the closing pass over the goals, part 1: the recipes' rollout path (engine, compiled layers, fused
    # projections) over 16 steps of new region sizes against generate with the dynamic and the static cache; the
    # graphed tiny loop (12 workers); the tiny recipe through the driver
    run rollout 330 python3 benchmarks/gpu/rollout.py --paths engine_fused generate_dynamic generate_static \
      --steps 16 --slow-steps 3 --static-steps 2 --skip-check --out "$OUT/rollout.json"
    tiny_loops "defaults"
    recipe_run 1200 150
    ;;
  final_b)  # part 2: each algorithm's whole step at the 4B recipe's batch with the 141 GB card's learner settings
    # (one micro-batch, blocks compiled with the C++ wrapper), each update's MFU with its own FLOPs, against the
    # naive loop on one region; the algorithms in $ALGOS, the last in what is left of ${BUDGET:-560} s
    learner=(--accumulation 1 --flops-each --naive-regions 1
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp)
    read -r -a algos <<<"${ALGOS:-sft_dual grpo}"
    for algo in "${algos[@]}"; do
      if [ "$algo" = grpo ]; then shape=(--batch-size 4 --generations 8 --steps 5); else shape=(--batch-size 8 --steps 8); fi
      limit=$((${BUDGET:-560} - SECONDS))
      [ "$limit" -lt 120 ] && { echo "== whole_$algo: not run, ${limit}s left"; continue; }
      if [ "$algo" != "${algos[-1]}" ] && [ "$limit" -gt 330 ]; then limit=330; fi
      run "whole_$algo" "$limit" python3 $steps --algos "$algo" "${shape[@]}" "${learner[@]}" --out "$OUT/whole_$algo.json"
    done
    ;;
  final_c)  # part 3: the 4B sft_dual update on new batches, then again on the same batches (new shapes' cost against
    # each batch's own: times, allocator segments, kernel time); then grpo's whole step as in final_b, in what is left
    # of ${BUDGET:-560} s
    learner=(--accumulation 1 --flops-each
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp)
    run replay_sft_dual 300 python3 $steps --algos sft_dual --batch-size 8 --steps "${STEPS:-8}" --replay "${learner[@]}" \
      --out "$OUT/replay_sft_dual.json"
    left=$((${BUDGET:-560} - SECONDS))
    if [ "$left" -ge 200 ]; then
      run whole_grpo "$left" python3 $steps --algos grpo --batch-size 4 --generations 8 --steps 5 --naive-regions 1 \
        "${learner[@]}" --out "$OUT/whole_grpo.json"
    else
      echo "== whole_grpo: not run, ${left}s left"
    fi
    ;;
  alloc)  # the 4B sft_dual updates on new batches and replayed (final_c), one process per caching-allocator setting
    # in $CONFS (default: torch's own, sizes rounded to 8 divisions of each power of two, expandable segments, torch's
    # own again): new batches grew the allocator's cache by up to 173 segments an update, and those updates ran up to
    # 1.39x their replay. The first process compiles with a cold inductor cache (minutes), the others reuse it: the
    # last one repeats the first's setting on a warm cache. Under expandable segments the cache grows inside its
    # segments, so their new_segments stay near 0 and compare only the times
    learner=(--accumulation 1 --replay
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp)
    i=0
    for conf in ${CONFS:-default roundup_power2_divisions:8 expandable_segments:True default}; do
      i=$((i + 1))
      left=$((${BUDGET:-560} - SECONDS))
      [ "$left" -lt 150 ] && { echo "== alloc_$i ($conf): not run, ${left}s left"; continue; }
      limit=$((i == 1 ? 300 : 150))
      [ "$limit" -gt "$left" ] && limit=$left
      if [ "$conf" = default ]; then unset PYTORCH_CUDA_ALLOC_CONF; else export PYTORCH_CUDA_ALLOC_CONF=$conf; fi
      run "alloc_${i}" "$limit" python3 $steps --algos sft_dual --batch-size 8 --steps 8 "${learner[@]}" \
        --out "$OUT/alloc_${i}.json"
    done
    unset PYTORCH_CUDA_ALLOC_CONF
    ;;
  steady)  # ${ALGO:-sft_dual}'s learner as in final_b, ${STEPS:-36} steps of which the first ${WARMUP:-16} are
    # warm-up, one process per caching-allocator setting in $CONFS (default: torch's own, then expandable segments),
    # in what is left of ${BUDGET:-560} s, 150 s of it kept for each setting still to come (the first compiles with a
    # cold inductor cache: about 425 s for 36 sft_dual steps, 2026-12-03)
    read -r -a confs <<<"${CONFS:-default expandable_segments:True}"
    algo=${ALGO:-sft_dual}
    if [ "$algo" = grpo ]; then shape=(--batch-size 4 --generations 8); else shape=(--batch-size 8); fi
    for i in "${!confs[@]}"; do
      conf=${confs[$i]}
      name="steady_${algo}${TAG:+_$TAG}_$((i + 1))"
      limit=$((${BUDGET:-560} - SECONDS - 150 * (${#confs[@]} - i - 1)))
      [ "$limit" -lt 120 ] && { echo "== $name ($conf): not run, ${limit}s left for it"; continue; }
      if [ "$conf" = default ]; then unset PYTORCH_CUDA_ALLOC_CONF; else export PYTORCH_CUDA_ALLOC_CONF=$conf; fi
      # shellcheck disable=SC2086  # SETS holds several overrides
      run "$name" "$limit" python3 $steps --algos "$algo" "${shape[@]}" --accumulation 1 --steps "${STEPS:-36}" \
        --warmup "${WARMUP:-16}" --flops-each \
        --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp ${SETS:-} \
        --out "$OUT/$name.json"
    done
    unset PYTORCH_CUDA_ALLOC_CONF
    ;;
  fused)  # the 4B sft_dual learner as in steady (${STEPS:-28} steps, the first ${WARMUP:-12} warm-up), then the timed
    # steps' updates again on their batches, the LLM's sibling projections one by one and grouped
    # (model.train_fuse_projections), alternating, each kind's MFU over the same FLOPs; one process
    # shellcheck disable=SC2086  # SETS holds several overrides
    run "fused_sft_dual${TAG:+_$TAG}" "${LIMIT:-570}" python3 $steps --algos sft_dual --batch-size 8 --accumulation 1 \
      --steps "${STEPS:-28}" --warmup "${WARMUP:-12}" --flops-each --compare-projections \
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp ${SETS:-} \
      --out "$OUT/fused_sft_dual${TAG:+_$TAG}.json"
    ;;
  gc)  # the grouped loop as in fused (its 28 steps and batches, the last 16 timed), each update's time in Python's
    # collector, then what a full collection costs in that process (2026-12-05 this ran twice, with and without the
    # former train.gc_freeze of commit 4a77f5a)
    # shellcheck disable=SC2086  # SETS holds several overrides
    run "gc_sft_dual${TAG:+_$TAG}" "${LIMIT:-300}" python3 $steps --algos sft_dual --batch-size 8 --accumulation 1 \
      --steps "${STEPS:-28}" --warmup "${WARMUP:-12}" --set model.gradient_checkpointing=false model.train_compile=true \
      model.train_compile_wrapper=cpp model.train_fuse_projections=true ${SETS:-} --out "$OUT/gc_sft_dual${TAG:+_$TAG}.json"
    ;;
  gc_tiny)  # pretrain_tiny through the driver: steps/s and the collector's time a step (step/gc/ms)
    recipe_run 1200 150 pretrain_tiny_gc
    ;;
  gaps)  # steady's settings, fewer steps; the profiled update is the last batch's again (its sizes met)
    # shellcheck disable=SC2086  # SETS holds several overrides
    run "gaps_sft_dual${TAG:+_$TAG}" "${LIMIT:-540}" python3 $steps --algos sft_dual --batch-size 8 --accumulation 1 \
      --steps "${STEPS:-12}" --warmup "${WARMUP:-8}" --profile-learner \
      --set model.gradient_checkpointing=false model.train_compile=true model.train_compile_wrapper=cpp ${SETS:-} \
      --out "$OUT/gaps_sft_dual${TAG:+_$TAG}.json"
    ;;
  encodings)  # the 4B recipes as they ship for 80 GB cards (2 micro-batches, eager, no recomputation): the update
    # with its micro-batches taking their rows of the teacher's encoding against each encoding its own, alternating
    run encodings_sft_dual "${LIMIT:-240}" python3 $steps --algos sft_dual --batch-size 8 --accumulation 2 --steps 4 \
      --compare-encodings --out "$OUT/encodings_sft_dual.json"
    run encodings_grpo "${LIMIT:-240}" python3 $steps --algos grpo --batch-size 4 --generations 8 --accumulation 2 \
      --steps 4 --compare-encodings --out "$OUT/encodings_grpo.json"
    ;;
  checks)
    run cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_transfer.py
    run sync_sites 240 python3 $steps --algos sft_dual grpo --batch-size 4 --generations 8 --accumulation 1 --steps 2 \
      --set model.gradient_checkpointing=false --sync-sites --out "$OUT/sync_sites.json"
    run tiny_step 150 python3 benchmarks/gpu/tiny_steps.py --only step --steps 40 --warmup 10 --out "$OUT/tiny_step.json"
    ;;
  whole)  # the recipes' settings (sa2va_4b_sft_dual.yaml, its grpo part) against the naive loop on one region
    run whole_sft_dual 250 python3 $steps --algos sft_dual --batch-size 8 --accumulation 2 --steps 5 \
      --naive-regions 1 --out "$OUT/whole_sft_dual.json"
    run whole_grpo 270 python3 $steps --algos grpo --batch-size 4 --generations 8 --accumulation 2 --steps 5 \
      --naive-regions 1 --out "$OUT/whole_grpo.json"
    ;;
  compile_tiny)  # pretrain_tiny's learner step at batch 64, eager then with its blocks compiled, same process
    run tiny_compile 400 python3 benchmarks/gpu/tiny_steps.py --only step --steps 100 --warmup 10 --compare-compile \
      --out "$OUT/tiny_compile.json"
    ;;
  compile_sft)  # the 4B sft_dual learner update at the recipe's batch, eager then compiled, same batch
    run sft_compile 480 python3 $steps --algos sft_dual --batch-size 8 --accumulation 2 --steps 4 --compare-compile \
      --out "$OUT/sft_compile.json"
    ;;
  compile_grpo)
    run grpo_compile 480 python3 $steps --algos grpo --batch-size 4 --generations 8 --accumulation 2 --steps 4 \
      --compare-compile --out "$OUT/grpo_compile.json"
    ;;
  *) echo "usage: issue11.sh final_a|final_b|final_c|alloc|rollout|decode|learner|learner_compiled|token_rows|probe|wrapper|tiny_wrapper|tiny_graphs|tiny_precision|tiny_host|tiny_loop_matrix|tiny_final|tiny_ledger|ledger_final|sft_mfu|checks|whole|compile_tiny|compile_sft|compile_grpo" >&2; exit 2 ;;
esac
# A call brings back only a few files: past 8, everything under $OUT goes back as one archive
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar -C "$OUT" -czf /tmp/issue11-results.tgz . && find "$OUT" -mindepth 1 -delete && mv /tmp/issue11-results.tgz "$OUT/"
fi
