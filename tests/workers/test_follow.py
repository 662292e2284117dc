"""A follower's part of rank 0's calls: it joins the gather a weight sync needs, without the host copy that only
rank 0's answer needs."""

from __future__ import annotations

import torch

from dualrl.recipe import load_recipe
from dualrl.workers.learner import Learner
from tests.conftest import TINY


def test_a_follower_gathers_a_sync_without_copying_it_to_the_host(monkeypatch):
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x"])
    learner = Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu")
    gathered, copied = [], []
    real = learner.sync_tensors
    monkeypatch.setattr(learner, "sync_tensors", lambda which: gathered.append(which) or real(which))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copied.append(a) or self)
    assert learner.follow("sync_state", "ema") is None
    assert gathered == ["ema"] and copied == []
    learner.follow("rng")  # other calls run as they are
    monkeypatch.undo()
    assert set(learner.sync_state("policy")) == set(learner.model.trainable_state())
