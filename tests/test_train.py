"""End-to-end runs of the driver loop on the tiny model: the output contract and exact resume."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from dualrl.recipe import load_recipe
from dualrl.train import PauseClock, run
from tests.conftest import TINY, metric_abs


def _recipe(out, *extra):
    return load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", *extra])


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_the_output_contract(tmp_path):
    """A short sft_dual run writes metrics.jsonl (train, reward and eval keys), summary.json, a checkpoint
    with a latest pointer, and the resolved recipe."""
    out = tmp_path / "run"
    summary = run(_recipe(out, "train.steps=3", "eval.every=3"))
    lines = _lines(out)
    train = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    for key in ("train/loss_mask", "train/loss_dice", "train/llm_loss", "reward/mask_iou", "train/cycle_iou"):
        assert key in train[-1]
    for m in train:  # where a step's time went: waiting for its captions and rewards (made in it), then the update
        assert m["step/rollout/ms"] > 0 and m["step/reward/ms"] > 0 and m["step/learn/ms"] > 0
        assert m["step/rollout/ms"] + m["step/reward/ms"] <= m["step/wait/ms"] <= m["step/ms"] - m["step/learn/ms"]
        assert m["step/mean/ms"] >= m["step/ms"]  # the window of one step: from the last log line to this one
        assert m["step/gc/ms"] >= 0
    assert train[0]["step/gc/ms"] > 0  # a step makes thousands of objects: the youngest generation is collected
    evals = [m for m in lines if "eval/ref_miou" in m]
    assert [m["step"] for m in evals] == [0, 3] and "eval/cycle_miou" in evals[0]
    assert evals[0]["eval/reward_total"] == pytest.approx(evals[0]["eval/reward/mask_iou"])  # mask_iou alone, weight 1
    assert evals[0]["eval/reward/mask_iou"] == pytest.approx(evals[0]["eval/cycle_miou"])
    assert (out / "checkpoints" / "latest").read_text() == "step_3"
    assert (out / "checkpoints" / "step_3" / "trainable.safetensors").is_file()
    assert load_recipe(out / "recipe.yaml").train.steps == 3
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"] == 3
    assert set(summary["final"]) >= {"eval/ref_miou", "eval/cycle_miou"}


def test_max_minutes_stops_at_a_step_boundary_with_a_checkpoint_and_resumes(tmp_path):
    """With `train.max_minutes` passed (a limit the first step already exceeds) the run stops after one step,
    saves it and reports itself incomplete; the same command without the limit finishes the schedule."""
    out = tmp_path / "run"
    steps = ["train.steps=3", "eval.every=3", "eval.at_start=false", "train.save_every=3"]
    summary = run(_recipe(out, *steps, "train.max_minutes=1e-6"))
    assert summary["steps"] == summary["steps_this_run"] == 1 and not summary["complete"]
    assert (out / "checkpoints" / "latest").read_text() == "step_1"
    summary = run(_recipe(out, *steps))
    assert summary["steps"] == 3 and summary["steps_this_run"] == 2 and summary["complete"]
    assert [m["step"] for m in _lines(out) if "train/loss" in m] == [1, 2, 3]


def test_eval_split_select_evaluates_other_regions_than_val(tmp_path):
    """`eval.split=select` evaluates shapes' selection split (for choosing settings) instead of `val`: the same
    model at step 0 scores differently on the two; another source refuses it with a clear error."""
    first = {}
    for split in ("val", "select"):
        run(_recipe(tmp_path / split, "train.steps=1", "eval.every=5", f"eval.split={split}"))
        first[split] = _lines(tmp_path / split)[0]
        assert first[split]["step"] == 0
    assert first["val"]["eval/ref_miou"] != first["select"]["eval/ref_miou"]
    from dualrl.data.loader import DataError, EvalBatches
    from dualrl.recipe import RefCocoSpec

    recipe = _recipe(tmp_path / "x")
    data = recipe.data.model_copy(update={"refcoco": RefCocoSpec(root="r", images="i"), "eval_source": "refcoco"})
    with pytest.raises(DataError, match=r"eval\.split=select exists for the shapes source only"):
        EvalBatches(data, 64, 4, "select")


def test_interrupted_then_resumed_run_logs_the_same_metrics(tmp_path):
    """Stopping at step 2 and rerunning with the same output_dir resumes (weights, EMA, optimizer,
    scheduler, data position, RNG) and logs the same metrics at the same steps as an uninterrupted run."""
    steps = ["train.steps=4", "eval.every=4", "train.save_every=2"]
    run(_recipe(tmp_path / "whole", *steps))
    run(_recipe(tmp_path / "split", *steps, "train.stop_at_step=2"))
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["steps"] == 2
    run(_recipe(tmp_path / "split", *steps))
    whole, split = _lines(tmp_path / "whole"), _lines(tmp_path / "split")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "split")]
    assert summaries[0]["start"] == summaries[1]["start"] and "eval/ref_miou" in summaries[1]["start"]
    assert [m["step"] for m in whole] == [m["step"] for m in split]
    for a, b in zip(whole, split):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("sync/") or key.endswith("/ms"):  # wall-clock timings
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=metric_abs(key, 1e-6)), (a["step"], key)


def test_pretrain_runs_without_rollout(tmp_path):
    """The pretrain objective runs through the same loop without rollouts or rewards."""
    out = tmp_path / "pre"
    run(
        _recipe(
            out,
            "algo.name=pretrain",
            "train.steps=2",
            "eval.at_start=false",
            "eval.every=100",
            "model.trainable.lora=false",
            "model.trainable.llm=true",
        )
    )
    train = [m for m in _lines(out) if "train/loss" in m]
    assert "train/caption_loss" in train[-1] and "reward/mask_iou" not in train[-1]
    assert "step/rollout/ms" not in train[-1] and train[-1]["step/learn/ms"] > 0


def test_pretrain_syncs_the_teacher_only_to_evaluate(tmp_path, monkeypatch):
    """Without captions, the teacher is read only by evaluations: it gets the EMA weights before each of them (and
    once at the start), not after every step; `step/mean/ms` times the steps between log lines."""
    import dualrl.train
    from dualrl.runtime.local import LocalRuntime

    calls = []
    sync, evaluate = LocalRuntime.sync, dualrl.train.evaluate
    monkeypatch.setattr(LocalRuntime, "sync", lambda self: calls.append("sync") or sync(self))
    monkeypatch.setattr(dualrl.train, "evaluate", lambda *a, **k: calls.append("eval") or evaluate(*a, **k))
    out = tmp_path / "pre"
    run(_recipe(out, "algo.name=pretrain", "train.steps=4", "eval.at_start=false", "eval.every=2", "train.log_every=2"))
    assert calls == ["sync", "sync", "eval", "sync", "eval"]
    train = [m for m in _lines(out) if "train/loss" in m]
    assert [m["step"] for m in train] == [2, 4] and all("sync/ms" not in m for m in train)
    assert all(m["step/mean/ms"] > 0 for m in train)


def test_grpo_continues_from_an_earlier_run_and_resumes_exactly(tmp_path):
    """grpo starts from an sft_dual run's EMA weights (model.init_from), samples G captions per region,
    logs every reward, the GRPO diagnostics and a rollouts table, and resumes to the same metrics."""
    from safetensors.torch import load_file

    from dualrl.model.build import build_model

    run(_recipe(tmp_path / "sft", "train.steps=1", "eval.at_start=false"))
    grpo = [
        "algo.name=grpo",
        f"model.init_from={tmp_path / 'sft'}",
        "algo.grpo.num_generations=2",
        "rewards=[{name: mask_iou}, {name: length, weight: 0.1}, {name: repetition, weight: 0.1}]",
        "train.steps=3",
        "eval.every=3",
        "train.save_every=1",
    ]
    recipe = _recipe(tmp_path / "whole", *grpo)
    ema = load_file(str(tmp_path / "sft" / "checkpoints" / "step_1" / "ema.safetensors"))
    start = build_model(recipe.model).trainable_state()
    assert start.keys() == ema.keys() and all(torch.equal(start[k], ema[k]) for k in ema)

    run(recipe)
    run(_recipe(tmp_path / "split", *grpo, "train.stop_at_step=2"))
    run(_recipe(tmp_path / "split", *grpo))
    whole, split = _lines(tmp_path / "whole"), _lines(tmp_path / "split")
    train = [m for m in whole if "train/loss" in m]
    for key in (
        "reward/total",
        "reward/mask_iou",
        "reward/length",
        "reward/repetition/failures",
        "grpo/clip_frac",
        "grpo/adv_std",
        "grpo/zero_spread_frac",
        "grpo/caption_len",
        "train/seg_iou",
    ):
        assert key in train[-1], key
    assert [m["step"] for m in whole] == [m["step"] for m in split]
    for a, b in zip(whole, split):
        for key in a:
            if not (key.startswith("sync/") or key.endswith("/ms")):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=metric_abs(key, 1e-6)), (a["step"], key)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {"caption", "total", "mask_iou", "length"} <= rows[0].keys()


def test_pause_clock_counts_collections_and_leaves_with_close():
    hooks = len(gc.callbacks)
    clock = PauseClock()
    assert len(gc.callbacks) == hooks + 1
    clock.take()
    gc.collect()  # a full collection
    seconds, full = clock.take()
    assert seconds > 0 and full == 1
    gc.collect(0)  # the youngest generation only
    seconds, full = clock.take()
    assert seconds > 0 and full == 0
    clock.close()
    assert len(gc.callbacks) == hooks
    gc.collect()
    assert clock.take() == (0.0, 0)
