# Source on the GPU machine: installs the wheels carried in .whl (no registry there), gives METEOR the WordNet
# carried as .gpucarry/wordnet.tar.xz when it is there (`tar -C /usr/share -cJf .gpucarry/wordnet.tar.xz wordnet`),
# gives TRL stand-ins for `datasets` and, where the machine has none, `pandas` (imported at TRL's module level),
# prints versions.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p /tmp/stub/datasets
printf 'class IterableDataset: ...\n\n\nclass Dataset: ...\n' >/tmp/stub/datasets/__init__.py
# TRL's trainer utilities import pandas at module level too; grpo uses only their log-softmax
python3 -c "import pandas" 2>/dev/null || { mkdir -p /tmp/stub/pandas && printf '__version__ = "0"\n\n\nclass DataFrame: ...\n' >/tmp/stub/pandas/__init__.py; }
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
