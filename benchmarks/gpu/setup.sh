# Source on the GPU machine: installs the wheels carried in .whl (no registry there), gives METEOR the WordNet
# carried as .gpucarry/wordnet.tar.xz when it is there (`tar -C /usr/share -cJf .gpucarry/wordnet.tar.xz wordnet`),
# gives TRL a stand-in for `datasets` (imported at TRL's module level; the machine has none), prints versions.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p /tmp/stub/datasets
printf 'class IterableDataset: ...\n\n\nclass Dataset: ...\n' >/tmp/stub/datasets/__init__.py
export PYTHONPATH=/tmp/site:$PWD:/tmp/stub
export PYTHONUNBUFFERED=1
if [ -f .gpucarry/wordnet.tar.xz ]; then
  tar -C /tmp -xJf .gpucarry/wordnet.tar.xz || exit 1
  export DUALRL_WORDNET_DIR=/tmp/wordnet
fi
python3 - <<'PY'
import torch, transformers, peft, sam2
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "device", torch.cuda.get_device_name(0))
PY
