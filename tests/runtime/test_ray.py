"""The Ray runtime: the same driver loop with the workers as real Ray actors on a local instance."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

from dualrl.recipe import load_recipe  # noqa: E402
from dualrl.train import run  # noqa: E402
from tests.conftest import TINY  # noqa: E402


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ray_runtime_matches_local_and_syncs_only_trainable_weights(tmp_path):
    """runtime=ray trains, evaluates and checkpoints, logging the same metrics as runtime=local (the
    learner owns its randomness wherever it lives; only float summation order differs between the
    processes, hence the tolerance, and for the evaluation's IoU a pixel of the untrained model's near-empty
    overlaps: 1e-4 of an mIoU near 0.005); the weight sync carries the trainable tensors only
    (far fewer bytes than the model)."""
    common = [*TINY, "runtime.num_cpus=2", "train.steps=2", "eval.every=2"]
    recipe = load_recipe("recipes/sft_dual.yaml", [*common, f"output_dir={tmp_path / 'ray'}", "runtime.kind=ray"])
    summary = run(recipe)
    assert not ray.is_initialized()
    run(load_recipe("recipes/sft_dual.yaml", [*common, f"output_dir={tmp_path / 'local'}"]))
    lines, local = _lines(tmp_path / "ray"), _lines(tmp_path / "local")
    timing = lambda k: k.startswith("sync/") or k.endswith("/ms")  # noqa: E731  wall-clock, not results
    iou = lambda k: k.startswith("eval/") and "iou" in k  # noqa: E731  thresholded masks: whole pixels
    for a, b in zip(lines, local):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if not timing(k) and not iou(k)} == pytest.approx(
            {k: v for k, v in b.items() if not timing(k) and not iou(k)}, rel=2e-3, abs=1e-5
        )
        assert {k: v for k, v in a.items() if iou(k)} == pytest.approx({k: v for k, v in b.items() if iou(k)}, abs=5e-4)
    last = [m for m in lines if "train/loss" in m][-1]
    assert summary["runtime"] == "ray" and "eval/cycle_miou" in summary["final"]
    from dualrl.model.build import build_model

    model = build_model(recipe.model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert last["sync/bytes"] == trainable < total / 2


def test_ray_grpo_samples_from_the_synced_policy(tmp_path):
    """Under Ray, grpo's rollout actor gets the learner's policy weights and the reward actor the EMA's;
    with per-step sampling seeds it draws the captions the in-process runtime draws (which samples from
    the learner's own model), so rewards and losses match the local run."""
    common = [
        *TINY,
        "runtime.num_cpus=2",
        "train.steps=2",
        "eval.every=2",
        "eval.at_start=false",
        "algo.name=grpo",
        "algo.grpo.num_generations=2",
        "rewards=[{name: mask_iou}, {name: length}]",
    ]
    run(load_recipe("recipes/sft_dual.yaml", [*common, f"output_dir={tmp_path / 'ray'}", "runtime.kind=ray"]))
    run(load_recipe("recipes/sft_dual.yaml", [*common, f"output_dir={tmp_path / 'local'}"]))
    ray_lines, local = _lines(tmp_path / "ray"), _lines(tmp_path / "local")
    assert [m["step"] for m in ray_lines] == [m["step"] for m in local] == [1, 2, 2]
    for key in ("reward/mask_iou", "reward/total", "grpo/loss", "train/loss", "eval/cycle_miou"):
        for a, b in zip(ray_lines, local):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=2e-3, abs=1e-4), key
