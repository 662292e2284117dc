"""The local runtime copies the EMA into the teacher on the device: equal values, no shared storage."""

from __future__ import annotations

import torch

from dualrl.recipe import load_recipe
from dualrl.runtime.local import LocalRuntime
from tests.conftest import TINY


def test_sync_copies_the_ema_into_the_teacher_without_aliasing():
    runtime = LocalRuntime(load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x"]))
    ema = runtime.learner.ema.tensors()
    with torch.no_grad():
        for t in ema.values():
            t.add_(0.5)  # an EMA unlike the teacher's starting weights
    metrics = runtime.sync()
    teacher = dict(runtime.reward.model.named_parameters())
    assert all(torch.equal(teacher[n].float(), t) for n, t in ema.items())
    assert not {t.data_ptr() for t in ema.values()} & {teacher[n].data_ptr() for n in ema}
    assert metrics["sync/bytes"] == sum(t.numel() * 4 for t in ema.values())
    runtime.shutdown()


def test_a_frozen_teacher_is_copied_once():
    """algo.ema_decay=1: the first sync copies the EMA into the teacher; later ones copy nothing (it cannot
    have changed) and say so."""
    runtime = LocalRuntime(load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", "algo.ema_decay=1.0"]))
    first = runtime.sync()
    assert first["sync/bytes"] > 0
    teacher = dict(runtime.reward.model.named_parameters())
    name = next(iter(runtime.learner.ema.tensors()))
    with torch.no_grad():
        teacher[name].add_(1.0)  # a copy would undo this
    assert runtime.sync()["sync/bytes"] == 0.0
    assert not torch.equal(teacher[name].float(), runtime.learner.ema.tensors()[name])
    runtime.shutdown()
