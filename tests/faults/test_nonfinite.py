"""Non-finite training fails loudly: a bad step (non-finite loss, gradient, or weights after the update) is skipped and
counted, `train.max_nonfinite_steps` of them in a row stop the run with an error and a non-zero exit, no checkpoint
is written from non-finite weights, non-finite metrics are logged as null (not dropped), and no IoU turns a NaN
into a perfect score."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dualrl.algo.losses import mask_iou, soft_mask_iou
from dualrl.launch import main
from dualrl.recipe import load_recipe
from dualrl.train import TrainingDiverged, run
from tests.conftest import TINY

SHORT = ["eval.at_start=false", "train.save_every=1"]


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out, step: int) -> dict:
    return next(m for m in _lines(out) if m["step"] == step and "train/lr" in m)


def test_huge_learning_rate_stops_the_launch_with_an_error_and_writes_no_checkpoint(tmp_path, capsys):
    """optim.lr=1e30: step 1 blows the weights up (detected after the update), steps 2-3 have a NaN loss; at
    train.max_nonfinite_steps=3 (the default) the launch stops with one error line naming the step, what was
    non-finite and the learning rate, exits 1, writes no checkpoint, says complete: false, and logs the NaN losses
    and the NaN eval IoU as null."""
    out = tmp_path / "run"
    argv = ["recipes/sft_dual.yaml", *TINY, f"output_dir={out}", *SHORT, "optim.lr=1e30", "train.steps=8"]
    assert main([*argv, "eval.every=2"]) == 1
    err = capsys.readouterr().err
    assert "error: training stopped at step 3: 3 steps in a row" in err
    assert "step 1: the update" in err and "left non-finite weights" in err and "loss=nan" in err
    assert "optim.lr (now 1e+30)" in err and "No checkpoint was written" in err
    assert not list(out.glob("checkpoints/step_*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["steps"] == 3 and "step 3" in summary["error"]
    assert summary["skipped_nonfinite_steps"] == 3
    for step in (2, 3):
        train = _train(out, step)
        assert "train/loss" in train and train["train/loss"] is None
        assert train["train/nonfinite_in_a_row"] == step
    evals = [m for m in _lines(out) if "eval/ref_miou" in m]
    assert [m["step"] for m in evals] == [2] and evals[0]["eval/ref_miou"] is None  # the student's NaN masks


class NanLossAt:
    """The run's objective, with a NaN loss at its `call`-th call (or at each call in a set of them, from 1)."""

    def __init__(self, objective, call: int | set[int]):
        self.objective, self.nan_calls, self.calls = objective, {call} if isinstance(call, int) else call, 0

    def __getattr__(self, name: str):
        return getattr(self.objective, name)

    def __call__(self, *args):
        out = self.objective(*args)
        self.calls += 1
        if self.calls in self.nan_calls:
            out.loss = out.loss * float("nan")
        return out


def test_a_nan_loss_once_is_skipped_and_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    """A NaN loss at step 2 only: that update is skipped (logged null, counted in train/skipped_nonfinite and in a
    row), step 3 trains again (the count in a row goes back to 0), the run completes and saves its checkpoints."""
    import dualrl.workers.learner as learner

    real = learner.build_objective
    monkeypatch.setattr(learner, "build_objective", lambda *a: NanLossAt(real(*a), call=2))
    out = tmp_path / "run"
    summary = run(load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", *SHORT, "train.steps=3"]))
    assert summary["complete"] and summary["skipped_nonfinite_steps"] == 1
    one, two, three = (_train(out, s) for s in (1, 2, 3))
    assert two["train/loss"] is None and two["train/skipped_nonfinite"] == 1 and two["train/nonfinite_in_a_row"] == 1
    assert math.isfinite(three["train/loss"]) and three["train/nonfinite_in_a_row"] == 0
    assert one["train/skipped_nonfinite"] == 0 and three["train/skipped_nonfinite"] == 1
    assert (out / "checkpoints" / "latest").read_text() == "step_3"


def test_nonfinite_weights_are_never_checkpointed_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch):
    """The second optimizer step leaves a NaN in the weights: step 1's checkpoint stays the latest (none is written
    at steps 2-4, nor do they rotate it out), its weights and EMA are finite, and the run stops at step 4."""
    real_step = torch.optim.AdamW.step
    calls = []

    def poisoned_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "run"
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", *SHORT, "train.steps=8"])
    with pytest.raises(TrainingDiverged, match=r"stopped at step 4.*The last checkpoint, step_1, stays"):
        run(recipe)
    assert (out / "checkpoints" / "latest").read_text() == "step_1"
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_1"]
    for path in (out / "checkpoints" / "step_1").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path.name
    assert json.loads((out / "summary.json").read_text())["complete"] is False


def test_iou_of_nan_logits_is_nan_not_a_perfect_score():
    """A mask whose logits hold a NaN scores NaN in the hard and the soft IoU, also against an empty mask (where a
    NaN union used to count as "both empty", 1.0); finite masks keep their IoUs, empty vs empty still 1."""
    logits = torch.full((4, 2, 2), -5.0)
    logits[0, 0, 0] = float("nan")  # NaN vs an empty mask
    logits[1] = float("nan")  # NaN vs a full mask
    logits[3, 0, 0] = 5.0  # one pixel of four vs one: IoU 1
    gt = torch.zeros(4, 2, 2)
    gt[1] = 1.0
    gt[3, 0, 0] = 1.0
    hard = mask_iou(logits, gt)
    assert hard[:2].isnan().all() and hard[2:].tolist() == [1.0, 1.0]  # row 2: empty vs empty
    soft = soft_mask_iou(logits, gt)
    p, q = torch.sigmoid(torch.tensor(5.0)).item(), torch.sigmoid(torch.tensor(-5.0)).item()
    assert soft[:2].isnan().all() and soft[2] == 0.0 and soft[3].item() == pytest.approx(p / (1 + 3 * q))
    nothing = soft_mask_iou(torch.full((1, 2, 2), -torch.inf), torch.zeros(1, 2, 2))
    assert nothing.tolist() == [1.0]  # sigmoid exactly 0 everywhere vs empty: both empty


def test_logger_writes_nonfinite_values_as_null(tmp_path):
    """NaN and inf metrics become null in metrics.jsonl (valid JSON, the key kept); None is not measured, left out."""
    from dualrl.logger import RunLogger
    from dualrl.recipe import WandbSpec

    logger = RunLogger(WandbSpec(mode="disabled"), 1, "t", tmp_path, 0, {}, resumed=False)
    logger.log(1, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": 0.5, "x": None})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1,
        "train/loss": None,
        "train/grad_norm": None,
        "train/lr": 0.5,
    }
