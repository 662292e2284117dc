"""Checks kept on the device (`optim.fused`, a GPU's default; here AdamW's fused CPU kernel): a bad update is skipped
and kept out of the EMA by device flags, the figures are read only on the steps that use them, and what the run logs,
counts and saves is what reading every step gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dualrl.recipe import load_recipe
from dualrl.runtime import start_runtime
from dualrl.train import TrainingDiverged, run, step_generator
from dualrl.workers import ledger as ledger_module
from dualrl.workers.learner import nonfinite_tensors
from dualrl.workers.ledger import Ledger
from tests.conftest import TINY
from tests.faults.test_nonfinite import NanLossAt

FUSED = [*TINY, "optim.fused=true", "eval.at_start=false"]


def _reads(monkeypatch) -> list[int]:
    """The number of updates each read of the ledger found waiting (reads that found none are not listed)."""
    found: list[int] = []
    settle = Ledger.settle

    def counting(self):
        if self._pending:
            found.append(len(self._pending))
        return settle(self)

    monkeypatch.setattr(Ledger, "settle", counting)
    return found


def _train_lines(out) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("train/")} for m in lines if "train/lr" in m}


def test_reading_every_third_step_logs_counts_and_saves_what_reading_every_step_does(tmp_path, monkeypatch):
    """A NaN loss at step 2, six steps: read at every step, and read only where the run logs (3, 6). The second run
    leaves the updates on the device in between (two reads of three updates each), and its logged figures (loss,
    counts of bad updates, ...) at steps 3 and 6 and its final weights and EMA are the first run's."""
    import dualrl.workers.learner as learner

    real = learner.build_objective
    monkeypatch.setattr(learner, "build_objective", lambda *a: NanLossAt(real(*a), call=2))
    runs = {}
    for log_every in (1, 3):
        reads = _reads(monkeypatch)
        out = tmp_path / f"every_{log_every}"
        args = [*FUSED, f"output_dir={out}", "train.steps=6", f"train.log_every={log_every}", "train.save_every=6"]
        summary = run(load_recipe("recipes/sft_dual.yaml", [*args, "eval.every=6"]))
        assert summary["complete"] and summary["skipped_nonfinite_steps"] == 1
        runs[log_every] = out
        assert reads == ([1] * 6 if log_every == 1 else [3, 3])
    every, third = _train_lines(runs[1]), _train_lines(runs[3])
    assert sorted(third) == [3, 6]
    assert every[2]["train/loss"] is None and every[2]["train/nonfinite_in_a_row"] == 1
    # two runs of one recipe in one process differ in the last bits on a CPU (1e-9 in the weights, with reads
    # every step in both), so the figures and weights are compared to float32 rounding, the counts exactly
    for step in (3, 6):
        assert third[step].keys() == every[step].keys()
        longest = "train/nonfinite_longest_run"  # since the last read: step 2's bad step is in the first window
        assert third[step][longest] == (1 if step == 3 else 0) and every[step][longest] == 0
        same = {k: v for k, v in every[step].items() if k != longest}
        assert {k: v for k, v in third[step].items() if k != longest} == pytest.approx(same, rel=1e-5, abs=1e-6)
        assert third[step]["train/skipped_nonfinite"] == 1 and third[step]["train/nonfinite_in_a_row"] == 0
    for name in ("trainable.safetensors", "ema.safetensors"):
        a, b = (load_file(out / "checkpoints" / "step_6" / name) for out in (runs[1], runs[3]))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), name


def test_a_diverging_run_stops_at_the_first_read_after_its_limit(tmp_path, monkeypatch):
    """optim.lr=1e30 with the checks on the device, reading every 2 steps: step 1 blows the weights up and every later
    step has a NaN loss; nothing is read at steps 1 and 3, so the run stops at step 4 (4 bad steps in a row, limit 3),
    naming step 1's non-finite weights, with no checkpoint written."""
    out = tmp_path / "run"
    args = [*FUSED, f"output_dir={out}", "optim.lr=1e30", "train.steps=8", "train.log_every=2", "train.save_every=8"]
    reads = _reads(monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"stopped at step 4.*step 1: the update .* left non-finite weights"):
        run(load_recipe("recipes/sft_dual.yaml", [*args, "eval.every=8"]))
    assert reads == [2, 2]
    assert not list(out.glob("checkpoints/step_*"))
    lines = _train_lines(out)
    assert sorted(lines) == [2, 4] and lines[4]["train/nonfinite_in_a_row"] == 4
    assert lines[4]["train/skipped_nonfinite"] == 4


def test_a_run_of_bad_steps_that_ends_before_the_read_still_stops_the_run(tmp_path, monkeypatch):
    """NaN losses at steps 2-4 (limit 3), a good step 5, and the first read at step 5: the run of three bad steps
    ended before the read, and the run stops there all the same, as reading every step would have at step 4."""
    import dualrl.workers.learner as learner

    real = learner.build_objective
    monkeypatch.setattr(learner, "build_objective", lambda *a: NanLossAt(real(*a), {2, 3, 4}))
    out = tmp_path / "run"
    args = [*FUSED, f"output_dir={out}", "train.steps=6", "train.log_every=5", "train.save_every=6", "eval.every=6"]
    with pytest.raises(TrainingDiverged, match=r"stopped at step 5: 3 steps in a row.*step 2: loss=nan"):
        run(load_recipe("recipes/sft_dual.yaml", args))
    five = _train_lines(out)[5]
    assert five["train/nonfinite_in_a_row"] == 0 and five["train/nonfinite_longest_run"] == 3


@pytest.mark.parametrize("bad", ["nan_loss", "broken_weights"])
def test_a_bad_update_moves_nothing_it_should_not_without_a_read(tmp_path, bad):
    """With the checks on the device and nothing read: a NaN loss leaves the weights, the optimizer's step count and
    the EMA bit for bit (the fused kernel skips on the device flag); an update that leaves non-finite weights
    (optim.lr=1e30) leaves the EMA bit for bit (gated by a device flag). The ledger reports either when it is read."""
    lr = ["optim.lr=1e30"] if bad == "broken_weights" else []
    recipe = load_recipe("recipes/sft_dual.yaml", [*FUSED, f"output_dir={tmp_path}", *lr])
    runtime = start_runtime(recipe)
    try:
        learner = runtime.learner
        assert learner.checks_on_device
        batch = _one_batch(recipe)
        rollout = _rollout(runtime, recipe, batch)
        if bad == "nan_loss":  # a good update first, so that the EMA and the weights differ
            learner.objective = NanLossAt(learner.objective, {2})
            learner.step(batch, rollout, step_generator(0, 1), read=False)
        ema = {k: v.clone() for k, v in learner.ema.tensors().items()}
        weights = {k: v.detach().clone() for k, v in learner.trainable.items()}
        if bad == "nan_loss":
            assert not all(torch.equal(ema[k], weights[k].float()) for k in ema)
        metrics = learner.step(batch, rollout, step_generator(0, 2), read=False)
        assert "train/loss" not in metrics and learner.ledger.pending
        assert all(torch.equal(ema[k], v) for k, v in learner.ema.tensors().items())
        if bad == "nan_loss":
            assert all(torch.equal(weights[k], v) for k, v in learner.trainable.items())
            steps = {float(s["step"]) for s in learner.optimizer.state.values()}
            assert steps == {1.0}  # step 1's
            assert learner.skipped_steps == 1 and "update skipped" in learner.ledger.reports[0]
        else:
            assert nonfinite_tensors(learner.trainable)  # NaN, inf or a norm that overflows
            assert learner.skipped_steps == 1 and "left non-finite weights" in learner.ledger.reports[0]
    finally:
        runtime.shutdown()


def test_resuming_takes_this_runs_optimizer_kernel(tmp_path):
    """A run saved with AdamW's plain kernel (a CPU's default) resumes with optim.fused (as on a GPU) and trains its
    next step from the saved state (torch would keep the checkpoint's plain kernel, which refuses the device flag)."""
    out = tmp_path / "run"
    args = [*TINY, f"output_dir={out}", "eval.at_start=false", "train.save_every=2", "eval.every=100"]
    run(load_recipe("recipes/sft_dual.yaml", [*args, "train.steps=2"]))
    summary = run(load_recipe("recipes/sft_dual.yaml", [*args, "train.steps=3", "optim.fused=true"]))
    assert summary["complete"] and summary["steps_this_run"] == 1 and summary["skipped_nonfinite_steps"] == 0


def _one_batch(recipe) -> dict:
    from dualrl.data.loader import train_batches

    batches = train_batches(recipe.data, recipe.model.sam.image_size)
    try:
        return next(batches)
    finally:
        batches.close()


def _rollout(runtime, recipe, batch):
    from dualrl.algo.registry import objective_class
    from dualrl.algo.rollout_data import Rollout

    plan = objective_class(recipe.algo).plan(recipe)
    captions = runtime.rollout.describe(batch, plan, 1)
    return Rollout(captions, plan.group_size, runtime.reward.score(batch, captions, plan.group_size).total)


def _add(ledger: Ledger, step: int, loss: float, finite: list[bool], figure: float = 1.0) -> None:
    t = torch.tensor
    bad = t(loss != loss)  # NaN
    ledger.add(step, t(loss), t(0.5), bad, t(finite), {"train/loss": t(loss), "x": t(figure), "host": 2.0}, {})


NAN = float("nan")


def test_the_ledger_counts_steps_in_order_from_one_read(caplog):
    """Updates of several steps (two a step at steps 1-2, as GRPO's iterations make) read at once: a step is bad when
    any of its updates is, the bad updates are counted and reported in order, the run of bad steps restarts at a good
    step, the longest run since the window began is kept, and a read returns the last step's updates."""
    ledger = Ledger(["a", "b"])
    _add(ledger, 1, 1.0, [True, True])
    _add(ledger, 1, NAN, [True, True])  # step 1 is bad: its second update is
    _add(ledger, 2, NAN, [True, True])  # step 2 is bad: its first update is
    _add(ledger, 2, 2.0, [True, True])
    with caplog.at_level("WARNING", logger=ledger_module.log.name):
        ledger.settle()
    assert ledger.skipped == 2 and ledger.in_a_row == 2 and ledger.longest == 2 and len(ledger.reports) == 2
    ledger.new_window()
    _add(ledger, 3, 3.0, [True, True])  # good: the run of bad steps ends
    _add(ledger, 4, 4.0, [True, False])  # broke tensor b
    _add(ledger, 5, NAN, [True, True], figure=7.0)
    last = ledger.settle()
    assert ledger.skipped == 4 and ledger.in_a_row == 2 and ledger.longest == 2 and not ledger.pending
    assert (
        ledger.reports
        == ledger.longest_reports
        == [
            "step 4: the update (loss=4, grad_norm=0.5) left non-finite weights in b, EMA not updated",
            "step 5: loss=nan, grad_norm=0.5, update skipped",
        ]
    )
    warned = [r.message.rsplit(" (", 1)[0] for r in caplog.records]
    skipped = [f"step {k}: loss=nan, grad_norm=0.5, update skipped" for k in (1, 2)]
    assert warned == [*skipped, *ledger.reports]
    assert len(last) == 1 and last[0].step == 5 and last[0].figures["x"] == 7.0 and last[0].figures["host"] == 2.0
    assert ledger.settle() == [] and ledger.skipped == 4
