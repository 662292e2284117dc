"""The Ray runtime: the same driver loop with the workers as real Ray actors on a local instance."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

from dualrl.recipe import load_recipe  # noqa: E402
from dualrl.train import run  # noqa: E402
from tests.conftest import TINY  # noqa: E402


def test_ray_runtime_completes_and_syncs_only_trainable_weights(tmp_path):
    """runtime=ray trains, evaluates and checkpoints; the weight sync carries the trainable tensors only
    (far fewer bytes than the model)."""
    out = tmp_path / "ray"
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", "runtime.kind=ray",
                                                   "runtime.num_cpus=2", "train.steps=2", "eval.every=2"])
    summary = run(recipe)
    assert not ray.is_initialized()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in lines if "train/loss" in m][-1]
    assert summary["runtime"] == "ray" and "eval/cycle_miou" in summary["final"]
    from dualrl.model.build import build_model

    model = build_model(recipe.model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert last["sync/bytes"] == trainable < total / 2
