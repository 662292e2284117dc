#!/usr/bin/env bash
# Ray for the GPU machine, which has no registry: one call carries at most 64 MiB with the tree, and Ray's wheel is
# 79 MB. This packs Ray 2.60 for Python 3.12 without what dualrl does not run (the Java jars, the dashboard's web
# client, RLlib, Data, Serve, Tune, Train, the LLM library), with its three binaries stripped of their symbol tables
# (file modes kept), as .gpucarry/ray-trim.tar.xz (~25 MB), and the wheels of Ray's own dependencies the machine may
# lack as .gpucarry/raydeps/. benchmarks/gpu/ray_one_gpu.sh installs both.
set -eu
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_get() { python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 -d "$@"; }
pip_get "$work" ray==2.60.0
mkdir -p .gpucarry/raydeps "$work/site"
pip_get .gpucarry/raydeps click jsonschema jsonschema-specifications referencing rpds-py attrs msgpack protobuf
python3 - "$work"/ray-*.whl "$work/site" <<'PY'
import os, sys, zipfile
wheel, site = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        path = z.extract(info, site)
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(path, mode)  # zipfile drops the executables' modes
PY
ray=$work/site/ray
rm -rf "$ray"/{jars,rllib,llm,data,serve,tune,train} "$ray/dashboard/client"
strip --strip-unneeded "$ray/_raylet.so" "$ray/core/src/ray/raylet/raylet" "$ray/core/src/ray/gcs/gcs_server"
tar -C "$work/site" -cJf .gpucarry/ray-trim.tar.xz .
ls -l .gpucarry/ray-trim.tar.xz .gpucarry/raydeps
