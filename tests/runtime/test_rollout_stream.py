"""The rollout stream's step made ahead (runtime.async_rollout) across a checkpoint: the resumed run takes the saved
captions and rewards of that step, made with weights one sync older than the checkpoint's, so it sees what an
uninterrupted run sees. Fake workers stand in for the Ray actors: their captions name the weights they hold."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from dualrl.algo.rollout_data import RolloutPlan
from dualrl.model.grounded_vlm import Captions
from dualrl.runtime.stream import RolloutStream
from rewards.registry import RewardResult

SPEC = SimpleNamespace(async_rollout=True, call_timeout_s=30.0)
STEPS = 4


class Batches:
    """The loader: batch n carries n; its state is its position."""

    def __init__(self, position: int = 0):
        self.position = position

    def __next__(self) -> dict:
        self.position += 1
        return {"index": self.position}

    def metrics(self) -> dict[str, float]:
        return {"data/position": float(self.position)}

    def state(self) -> dict:
        return {"data_position": self.position, "data_skipped": {}, "data_samples": {"shapes": self.position}}


class Workers:
    """Rollout and reward workers holding the weights of sync `version`."""

    def __init__(self, version: int = 0):
        self.version = version
        self.rollout = self.reward = self

    def describe(self, batch: dict, plan: RolloutPlan, seed: int) -> Captions:
        rows = plan.group_size
        return Captions(
            [f"weights {self.version}, batch {batch['index']}, seed {seed}"] * rows,
            [torch.tensor([self.version, batch["index"]])] * rows,
            [torch.full((2,), -0.5 * self.version)] * rows,
            [True] * rows,
            [torch.tensor([7])] * rows,
            [torch.zeros(1)] * rows,
        )

    def score(self, batch: dict, captions: Captions, group_size: int) -> RewardResult:
        total = torch.full((len(captions),), float(self.version))
        return RewardResult(total, {"fake": total.tolist()}, {"reward/fake": float(self.version)}, None)


def drive(stream: RolloutStream, workers: Workers, first: int, last: int) -> dict[int, tuple]:
    """Steps first..last as the driver takes them, each followed by a sync; what each step was given."""
    seen = {}
    for step in range(first, last + 1):
        inputs = stream.take(step, STEPS)
        rollout = inputs.rollout
        metrics = {k: v for k, v in inputs.metrics.items() if not k.endswith("/ms")}  # wall times differ
        seen[step] = (rollout.captions.texts, rollout.rewards.tolist(), rollout.off_policy, metrics)
        stream.settle()
        workers.version = step
    return seen


def stream_of(workers: Workers, batches: Batches, spec=SPEC) -> RolloutStream:
    return RolloutStream(workers, batches, RolloutPlan(group_size=2, sample=True), lambda step: 100 + step, spec)


def checkpoint_roundtrip(state: dict, tmp_path) -> dict:
    """Through the checkpoint's file format (torch.save, read back with weights_only=True)."""
    torch.save({"ahead": state}, tmp_path / "optimizer.pt")
    return torch.load(tmp_path / "optimizer.pt", weights_only=True)["ahead"]


def test_a_resumed_async_run_takes_the_saved_step_ahead(tmp_path):
    workers = Workers()
    with stream_of(workers, Batches()) as stream:
        whole = drive(stream, workers, 1, STEPS)
    assert [texts[0].split(",")[0] for texts, *_ in whole.values()] == ["weights 0"] * 2 + ["weights 1", "weights 2"]

    workers = Workers()
    with stream_of(workers, Batches()) as stream:
        first = drive(stream, workers, 1, 2)
        saved = checkpoint_roundtrip(stream.ahead_state(2), tmp_path)
    assert saved["step"] == 3 and saved["data_state"]["data_position"] == 3
    resumed_workers = Workers(version=2)  # a resume syncs the checkpoint's weights to the workers
    with stream_of(resumed_workers, Batches(position=2)) as stream:
        stream.restore(saved)
        second = drive(stream, resumed_workers, 3, STEPS)
    assert {**first, **second} == whole

    # without the saved step, the resumed run makes step 3 with the checkpoint's weights: not what the whole run saw
    resumed_workers = Workers(version=2)
    with stream_of(resumed_workers, Batches(position=2)) as stream:
        fresh = drive(stream, resumed_workers, 3, 3)
    assert fresh[3][0] != whole[3][0] and fresh[3][2] is False


def test_a_saved_step_for_another_batch_is_made_again(tmp_path, caplog):
    workers = Workers()
    with stream_of(workers, Batches()) as stream:
        drive(stream, workers, 1, 2)
        saved = stream.ahead_state(2)
    resumed_workers = Workers(version=2)
    with stream_of(resumed_workers, Batches(position=5)) as stream, caplog.at_level(logging.WARNING):
        stream.restore(saved)
        given = drive(stream, resumed_workers, 3, 3)
    assert "not the one its saved captions were made for" in caplog.text
    texts, rewards, off_policy, metrics = given[3]
    assert texts[0].startswith("weights 2, batch 6") and rewards == [2.0, 2.0] and not off_policy
    assert metrics["async/staleness"] == 0.0


def test_without_async_rollout_a_saved_step_is_not_used(caplog):
    workers = Workers(version=2)
    sync = SimpleNamespace(async_rollout=False, call_timeout_s=30.0)
    saved = {"step": 3, "data_state": {}}
    with stream_of(workers, Batches(position=2), sync) as stream, caplog.at_level(logging.INFO):
        stream.restore(saved)
        given = drive(stream, workers, 3, 3)
        assert stream.ahead_state(3) is None
    assert "runtime.async_rollout is off" in caplog.text
    assert given[3][0][0].startswith("weights 2, batch 3")


def test_nothing_is_made_ahead_of_the_last_step():
    workers = Workers()
    with stream_of(workers, Batches()) as stream:
        drive(stream, workers, 1, STEPS - 1)
        assert stream.ahead_state(STEPS - 1)["step"] == STEPS
        drive(stream, workers, STEPS, STEPS)
        assert stream.ahead_state(STEPS) is None
