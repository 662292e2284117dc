"""Ray runtime: learner, rollout and reward workers as Ray actors.

The driver talks to them through `_Proxy`, which makes a remote call look like a local one, so the driver
loop is the same code for both runtimes. Weights travel once through the object store: the learner's
result is handed by reference to both workers.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import ray
import torch

from dualrl.algo.registry import objective_class
from dualrl.runtime import resolve_device
from dualrl.workers import Learner, RewardWorker, RolloutWorker

if TYPE_CHECKING:
    from dualrl.recipe import Recipe


class _Proxy:
    """An actor whose methods are called like local ones (the call waits for the result); `submit` starts a call
    and returns its object ref instead, for results handed on to other actors by reference."""

    def __init__(self, actor):
        self._actor = actor

    def submit(self, name: str, *args, **kwargs) -> ray.ObjectRef:
        return getattr(self._actor, name).remote(*args, **kwargs)

    def __getattr__(self, name):
        method = getattr(self._actor, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))


def _in_actor(cls, threads: int | None):
    class Hosted(cls):
        def __init__(self, *args, **kwargs):
            # Ray sets OMP_NUM_THREADS=1 for actors without CPUs; the workers take turns, so each may
            # use the machine's cores while it runs.
            torch.set_num_threads(threads or os.cpu_count() or 1)
            super().__init__(*args, **kwargs)

    Hosted.__name__ = Hosted.__qualname__ = cls.__name__
    return Hosted


class RayRuntime:
    def __init__(self, recipe: Recipe):
        spec = recipe.runtime
        if not ray.is_initialized():
            ray.init(
                address=spec.address,
                num_cpus=spec.num_cpus if spec.address is None else None,
                include_dashboard=False,
                log_to_driver=True,
            )
        device = resolve_device(recipe.train.device)
        opts = {"num_cpus": spec.worker_cpus, "num_gpus": spec.worker_gpus}
        threads = recipe.train.threads
        self.learner = _Proxy(
            ray.remote(**opts)(_in_actor(Learner, threads)).remote(
                recipe.model, recipe.algo, recipe.optim, recipe.train, device
            )
        )
        self.rollout = _Proxy(ray.remote(**opts)(_in_actor(RolloutWorker, threads)).remote(recipe.model, device))
        self.reward = _Proxy(
            ray.remote(**opts)(_in_actor(RewardWorker, threads)).remote(recipe.model, recipe.rewards, device)
        )

        self.rollout_weights = objective_class(recipe.algo).rollout_weights

    def sync(self) -> dict[str, float]:
        """Weights straight from the learner actor to the workers (the driver only passes refs): the EMA to
        the reward worker, and to the rollout worker the EMA (`sft_dual`) or the policy (`grpo`)."""
        t0 = time.perf_counter()
        ema = self.learner.submit("sync_state", "ema")
        policy = ema if self.rollout_weights == "ema" else self.learner.submit("sync_state", "policy")
        ray.get([self.rollout.submit("load_weights", policy), self.reward.submit("load_weights", ema)])
        copies = 1 if policy is ema else 2
        return {"sync/bytes": float(copies * self.learner.sync_bytes()), "sync/ms": 1000 * (time.perf_counter() - t0)}

    def shutdown(self) -> None:
        self.reward.close()
        ray.shutdown()
