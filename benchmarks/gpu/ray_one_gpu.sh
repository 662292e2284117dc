#!/usr/bin/env bash
# The Ray runtime on the one-GPU machine (benchmarks/gpu/ray_one_gpu.py), with Ray brought as a wheel: the machine
# has no registry, and Ray's wheel (79 MB) is over one call's transfer, so earlier calls on the same warm machine
# leave parts of it in /tmp/rayparts (`cp .raywhl/<part>/* /tmp/rayparts/`); this joins them and installs Ray.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu/setup.sh
cat /tmp/rayparts/ray.whl.part* > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl /tmp/rayparts/*.whl || exit 1
python3 -c "import ray; print('ray', ray.__version__)" || exit 1
timeout 560 python3 benchmarks/gpu/ray_one_gpu.py --steps 6 --out "$OUT/ray_one_gpu.json" 2>&1 | tail -n 40
