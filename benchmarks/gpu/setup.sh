# Source on the GPU machine: installs the wheels carried in .whl (no registry there) and prints versions.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, transformers, peft, sam2
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "device", torch.cuda.get_device_name(0))
PY
