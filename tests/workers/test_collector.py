"""Python's cyclic collector in a training process (`dualrl/workers/collector.py`): its pauses timed, and what the
first step leaves behind frozen when `train.gc_freeze` says so."""

from __future__ import annotations

import gc

import pytest
import torch

from dualrl.algo.rollout_data import Rollout
from dualrl.recipe import load_recipe
from dualrl.workers import collector
from dualrl.workers.learner import Learner
from dualrl.workers.rollout import RolloutWorker
from tests.conftest import TINY


@pytest.fixture
def unfrozen():
    gc.unfreeze()  # an earlier test's learner may have frozen this process's objects
    yield
    gc.unfreeze()


def test_pause_clock_counts_collections_and_leaves_with_close():
    hooks = len(gc.callbacks)
    clock = collector.PauseClock()
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


@pytest.mark.parametrize("freeze", [True, False])
def test_workers_freeze_survivors_after_their_first_call_only(region_batch, unfrozen, monkeypatch, freeze):
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=unused", f"train.gc_freeze={freeze}"])
    learner = Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu")
    rollout = RolloutWorker(recipe.model, "cpu", model=learner.model, gc_freeze=recipe.train.gc_freeze)
    calls = []
    freeze_now = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(gc.get_freeze_count()) or freeze_now())

    def step(seed: int) -> list[int]:
        captions = rollout.describe(region_batch, seed=seed)
        after_captions = len(calls)
        learner.step(region_batch, Rollout(captions), torch.Generator().manual_seed(seed))
        return [after_captions, len(calls)]

    assert step(0) == ([1, 2] if freeze else [0, 0])  # the rollout worker after its captions, the learner after its
    assert calls == ([0, calls[1]] if freeze else [])  # step
    if freeze:  # the learner froze what the rollout's freeze had not: its update's survivors (optimizer state, ...)
        assert 0 < calls[1] < gc.get_freeze_count()
    assert step(1) == ([2, 2] if freeze else [0, 0])  # neither freezes again
