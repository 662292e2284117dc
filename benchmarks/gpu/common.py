"""What the GPU benchmarks share: the stand-in `datasets` module, CUDA timing, the card's two ceilings, a model
built with its random init on the device, and the tiny model overrides that check a script on a CPU."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
try:  # trl imports `datasets` at module level for its trainers; dualrl takes two tensor functions from trl
    import datasets  # noqa: F401
except ImportError:  # the GPU machine has no `datasets` (pyarrow alone is over its upload limit): a stand-in
    sys.modules["datasets"] = types.ModuleType("datasets")
    sys.modules["datasets"].IterableDataset = type("IterableDataset", (), {})
    sys.modules["datasets"].Dataset = type("Dataset", (), {})

from dualrl.recipe import NANO_SAM_OVERRIDES  # noqa: E402  (after the path and the stand-in above)

TINY_MODEL = [
    "model.vision.hidden_size=64",
    "model.vision.layers=2",
    "model.vision.heads=2",
    "model.vision.intermediate_size=256",
    "model.vision.image_size=128",
    "model.vision.patch_size=8",
    "model.text.hidden_size=128",
    "model.text.layers=2",
    "model.text.heads=4",
    "model.text.kv_heads=2",
    "model.text.intermediate_size=512",
    "model.text.vocab_size=512",
    "model.sam.image_size=128",
    "model.sam.config=configs/sam2.1/sam2.1_hiera_t.yaml",
    "model.trainable.lora_r=8",
    "model.trainable.lora_alpha=16",
    "model.max_caption_tokens=8",
    "algo.loss.num_points=256",
    "model.precision=float32",
    "model.sam.overrides=" + json.dumps(NANO_SAM_OVERRIDES),
]

# A Sa2VA recipe without its checkpoint and data paths (none exist where the benchmarks run): random init, and the
# built-in shapes for every source (the caller sets their size)
NO_PATHS = [
    "model.sa2va=null",
    "model.init_from=null",
    "data.refcoco=null",
    "data.sa1b=null",
    "data.sav=null",
    "data.openimages=null",
    "data.eval_source=shapes",
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def facts() -> dict:
    """Versions and the machine. The kernel release tells GPU machines apart (6.18.44-fc-v1252 and -v1147 on
    2026-12-03, whose host work ran at different speeds): host-bound figures are compared on one machine only."""
    import platform

    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "kernel": platform.release(),
        "host": platform.node(),  # tells apart machines of one kernel release
        "cpu_cores": os.cpu_count(),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),  # the caching allocator's settings, if any
    }


def median_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median time of `fn()` in milliseconds: CUDA events on a GPU, the host clock elsewhere."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def ceilings(device: str, gib: float = 2.0, n: int = 8192) -> dict:
    """The card's two ceilings, measured: device-to-device copy bandwidth (bytes read + written) and a bf16
    n x n x n matrix product on random data (CPU: a small float32 one, only so the script runs there)."""
    if device != "cuda":
        n, dtype = 512, torch.float32
    else:
        dtype = torch.bfloat16
    src = torch.randn(int(gib * 2**30) // 2 if device == "cuda" else 2**22, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    mm_ms = median_ms(lambda: a @ b)
    bytes_moved = 2 * src.numel() * src.element_size()
    return {
        "copy_bytes_per_s": bytes_moved / (copy_ms / 1000),
        "matmul_flops_per_s": 2 * n**3 / (mm_ms / 1000),
        "matmul_n": n,
    }


def build_on_device(model_spec, device: str):
    """`build_model` with tensors created on `device`, so the random init of a multi-billion-parameter model runs
    there (seconds) rather than on the host's cores (minutes); weight values do not change speed."""
    from dualrl.model.build import build_model

    if device != "cuda":
        return build_model(model_spec, device)
    with torch.device(device):
        return build_model(model_spec, device)


@contextlib.contextmanager
def compiled_blocks(learner, wrapper: str = "python"):
    """The learner's repeated blocks compiled (`model.train_compile`, inductor's `wrapper`: python or cpp) inside the
    block, on the same model in the same process, so that eager and compiled updates are timed like for like. No
    `torch._dynamo.reset()` is needed around it: eager updates never enter torch.compile, and a learner built again
    (another algorithm) reuses the compilations (the same block code; nothing is guarded on which model holds the
    block; the two wrappers' compilations are kept apart, torch.compile guards on its backend)."""
    from dualrl.model.train_compile import CompiledBlocks

    if learner.compiled is not None:
        raise ValueError("--compare-compile times eager updates against compiled ones: leave model.train_compile off")
    learner.compiled = CompiledBlocks(learner.model, wrapper)
    try:
        yield
    finally:
        learner.compiled = None
