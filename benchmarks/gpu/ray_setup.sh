#!/usr/bin/env bash
# Sourced by the Ray benchmarks' scripts on a GPU machine: benchmarks/gpu/setup.sh, then Ray from
# /tmp/keep/ray-trim.tar.xz (made by benchmarks/gpu/pack_ray.sh, carried there by an earlier call on the same warm
# machine) and those of its dependencies the machine lacks, from .gpucarry/raydeps.
source benchmarks/gpu/setup.sh
tar -C /tmp/site -xJf /tmp/keep/ray-trim.tar.xz || exit 1
for pair in msgpack:msgpack click:click jsonschema:jsonschema jsonschema_specifications:jsonschema_specifications \
  referencing:referencing rpds:rpds_py attrs:attrs google.protobuf:protobuf; do
  python3 -c "import ${pair%%:*}" 2>/dev/null && continue
  echo "installing ${pair#*:}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpucarry/raydeps/"${pair#*:}"-*.whl || exit 1
done
python3 -c "import ray; print('ray', ray.__version__)" || exit 1
