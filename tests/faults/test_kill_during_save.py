"""A run SIGKILLed while it writes a checkpoint resumes, on the next launch, to the metrics and weights of a run that
was never interrupted. The kill is real (the training process sends SIGKILL to itself) and comes at three moments
of the step-3 save: after its first tensor file, and after its folder was renamed into place but before `latest`
moved. (A kill after `latest` moved but before older steps were pruned also resumes exactly: the child script
takes `prune` for it.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dualrl.recipe import load_recipe
from dualrl.train import run
from tests.conftest import TINY, metric_abs

# One intra-op thread: with two, about one process in three ends with other last bits in its weights (some CPU
# kernel sums in another order), and the killed run trains in a process of its own; with one, every process gives
# the same bits
RUN = [
    "train.steps=4",
    "train.save_every=1",
    "train.keep_checkpoints=2",
    "eval.at_start=false",
    "eval.every=2",
    "train.threads=1",
]
KILLED_AT = 3
DEADLINE_S = 600

# Runs the same launch in a child process whose checkpoint writer kills the process at one point of one save.
CHILD = """
import os, signal, sys
import dualrl.checkpoint as ck
from dualrl.recipe import load_recipe
from dualrl.train import run

moment, step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
saving = {"step": None}
real_save, real_tensors, real_replace, real_prune = ck.save_checkpoint, ck._save_tensors, ck.os.replace, ck._prune

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save(output_dir, at, *args, **kw):
    saving["step"] = at
    return real_save(output_dir, at, *args, **kw)

def tensors(state, path):
    real_tensors(state, path)
    if moment == "tensors" and saving["step"] == step:
        die()

def replace(src, dst):
    if moment == "pointer" and saving["step"] == step and os.path.basename(dst) == "latest":
        die()
    real_replace(src, dst)

def prune(root, saved, keep):
    if moment == "prune" and saved == step:
        die()
    real_prune(root, saved, keep)

ck.save_checkpoint, ck._save_tensors, ck.os.replace, ck._prune = save, tensors, replace, prune
import dualrl.train as train
train.save_checkpoint = save
run(load_recipe("recipes/sft_dual.yaml", overrides))
"""


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _timing(key: str) -> bool:
    return key.startswith("sync/") or key.endswith("/ms") or key.endswith("_s") or "per_s" in key


@pytest.fixture(scope="module", autouse=True)
def _threads_restored():
    """The runs here set this process's intra-op threads (RUN); the modules after this one get torch's count back
    (autouse: made before `whole`, which is of the same scope)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run(load_recipe("recipes/sft_dual.yaml", [*TINY, *RUN, f"output_dir={out}"]))
    return out


@pytest.mark.parametrize("moment", ["tensors", "pointer"])
def test_a_run_killed_during_a_save_resumes_to_the_uninterrupted_metrics_and_weights(whole, tmp_path, moment):
    out = tmp_path / "run"
    overrides = [*TINY, *RUN, f"output_dir={out}"]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, moment, str(KILLED_AT), *overrides],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (out / "summary.json").exists()  # it died mid-run

    run(load_recipe("recipes/sft_dual.yaml", overrides))

    expected, got = _lines(whole), _lines(out)
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            if not _timing(key):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=metric_abs(key, 1e-7)), (a["step"], key)
    for name in ("trainable.safetensors", "ema.safetensors"):
        a = load_file(whole / "checkpoints" / "step_4" / name)
        b = load_file(out / "checkpoints" / "step_4" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] - b[key]).abs().max().item() <= 1e-6, (name, key)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_3", "step_4"]  # keep_checkpoints=2, and nothing left of the interrupted save
    assert not list((out / "checkpoints").glob(".*tmp"))
