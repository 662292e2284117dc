#!/usr/bin/env bash
# The Ray runtime on the one-GPU machine (benchmarks/gpu/ray_one_gpu.py), with Ray brought from this machine: the GPU
# machine has no registry, and Ray does not fit in one call with the tree and the other wheels. So a first call
# carries .gpucarry/ray-trim.tar.xz (made by benchmarks/gpu/pack_ray.sh) and copies it to /tmp/keep; a second call
# on the still-warm machine carries .whl and .gpucarry/raydeps and runs this:
#   RUNS="object_store cuda_ipc" bash benchmarks/gpu/ray_one_gpu.sh
# It installs Ray and those of its dependencies the machine lacks, runs the CUDA IPC test (unless SKIP_TEST is set),
# then the runs named.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu/ray_setup.sh
if [ -z "${SKIP_TEST:-}" ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_ipc.py 2>&1 | tee "$OUT/test_cuda_ipc.log" |
    tail -n 3 || exit 1
fi
# shellcheck disable=SC2086  # the runs are words
timeout "${BENCH_TIMEOUT_S:-540}" python3 benchmarks/gpu/ray_one_gpu.py --steps 6 --runs ${RUNS:-object_store cuda_ipc} \
  --out "$OUT/ray_one_gpu.json" 2>&1 | tail -n 40
