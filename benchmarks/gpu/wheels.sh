# Run on the CPU machine: fills .whl (gitignored) with the wheels the GPU machine lacks, for Python 3.12 on x86-64
# Linux, at the versions this checkout's venv holds (benchmarks/gpu/setup.sh installs them there; no registry there).
# wandb (20 MB) is left out: the benchmarks log nothing to it. sam2, antlr4 and iopath publish only source archives:
# they are built here (pure Python; sam2 without its optional CUDA extension) and tagged for any Python.
set -euo pipefail
rm -rf .whl && mkdir -p .whl  # only this script fills it: an older version left there would be installed too
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pip_or_fail() {  # a pip command; its output is shown (less the index's location warnings) only when it fails
  local out
  out=$("$@" 2>&1) || { grep -v "^WARNING: Location" <<<"$out" >&2; echo "failed: $*" >&2; exit 1; }
}
for name in hydra-core omegaconf portalocker trl nltk pycocotools pydantic pydantic-core \
  typing-inspection annotated-types joblib regex click; do
  pip_or_fail python3 -m pip download -q --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all: -d .whl \
    "$name==$(version "$name")"
done
for name in sam2 antlr4-python3-runtime iopath; do
  SAM2_BUILD_CUDA=0 pip_or_fail .venv/bin/python -m pip wheel -q --no-deps -w .whl/build "$name==$(version "$name")"
done
pip_or_fail .venv/bin/python -m pip install -q wheel
for w in .whl/build/*.whl; do
  .venv/bin/python -m wheel tags --remove --python-tag py3 --abi-tag none --platform-tag any "$w" >/dev/null
done
mv .whl/build/*-py3-none-any.whl .whl/ && rm -rf .whl/build
ls .whl
du -sh .whl
