#!/usr/bin/env bash
# benchmarks/gpu/scaling.py on a GPU machine of several cards, with Ray brought as for ray_one_gpu.sh: a first call
# carries .gpucarry/ray-trim.tar.xz and copies it to /tmp/keep; a second call on the still-warm machine carries .whl
# and .gpucarry/raydeps and runs this, e.g.
#   ARGS="--gpus 1 2 --algos sft_dual --async --object-store --equivalence" bash benchmarks/gpu/scaling.sh
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu/ray_setup.sh
nvidia-smi -L
# shellcheck disable=SC2086  # the arguments are words
timeout "${BENCH_TIMEOUT_S:-570}" python3 benchmarks/gpu/scaling.py ${ARGS:-} --out "$OUT/scaling.json" 2>&1 | tail -n 40
