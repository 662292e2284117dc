"""In-process runtime: the three workers as plain objects. The rollout and reward workers both hold the
EMA weights, so here they share one model instead of keeping two identical copies."""

from __future__ import annotations

import time

from dualrl.model.build import build_model
from dualrl.runtime import resolve_device
from dualrl.workers import Learner, RewardWorker, RolloutWorker


class LocalRuntime:
    def __init__(self, recipe):
        device = resolve_device(recipe.train.device)
        self.learner = Learner(recipe, device)
        teacher = build_model(recipe.model, device)
        self.rollout = RolloutWorker(recipe, device, model=teacher)
        self.reward = RewardWorker(recipe, device, model=teacher)

    def sync(self) -> dict[str, float]:
        """EMA weights -> the teacher model shared by rollout and reward (trainable tensors only)."""
        t0 = time.perf_counter()
        state = self.learner.sync_state("ema")
        self.rollout.load_weights(state)
        return {"sync/bytes": float(self.learner.sync_bytes()), "sync/ms": 1000 * (time.perf_counter() - t0)}

    def shutdown(self) -> None:
        pass
