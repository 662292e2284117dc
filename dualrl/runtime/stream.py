"""Each step's inputs for the driver loop: the batch, its captions and rewards, and the data position after it.

With `ahead` (`runtime.async_rollout`), step t+1's captions and rewards are made in a background thread while the
learner trains on step t: the rollout and reward workers work beside the learner instead of waiting for it. They
use the weights of the last sync, one step older than the learner's (`async/staleness` 1; the first step's are
made in time, 0). `settle` waits for the step ahead to finish: the driver calls it before a sync and an evaluation,
so the weights a step ahead is made with, and so its results, do not depend on timing. A step made ahead but not
taken (the run stopped) is dropped; the data position saved is that of the last step taken, so a resume draws
the dropped batch again.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dualrl.algo.rollout_data import Rollout, RolloutPlan
from rewards.registry import RewardResult

if TYPE_CHECKING:
    from dualrl.recipe.run import RuntimeSpec


@dataclass
class StepInputs:
    batch: dict
    rollout: Rollout | None = None
    scored: RewardResult | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    data_state: dict[str, Any] = field(default_factory=dict)  # the loader's position once this batch was drawn


class RolloutStream:
    def __init__(self, runtime, batches, plan: RolloutPlan | None, seed_of: Callable[[int], int], spec: RuntimeSpec):
        """`seed_of(step)`: the rollout's sampling seed of a step. A wait for the step ahead is bounded by its
        calls' deadlines (a rollout and a reward call); the bound here only guards the thread."""
        self.runtime, self.batches, self.plan, self.seed_of = runtime, batches, plan, seed_of
        self.timeout_s = 4 * spec.call_timeout_s
        ahead = spec.async_rollout
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if ahead else None
        self._ahead: tuple[int, concurrent.futures.Future] | None = None

    def take(self, step: int, last: int) -> StepInputs:
        """Step `step`'s inputs (made ahead during the previous step, or now); starts step+1's when ahead and
        `step` < `last`."""
        if self._ahead is not None and self._ahead[0] == step:
            inputs = self._ahead[1].result(timeout=self.timeout_s)
        else:
            self.settle()
            inputs = self._make(step, stale=False)
        self._ahead = None
        if self._pool is not None and step < last:
            self._ahead = (step + 1, self._pool.submit(self._make, step + 1, True))
        return inputs

    def settle(self) -> None:
        """Wait until the step ahead (if any) is made; it stays to be taken."""
        if self._ahead is not None:
            self._ahead[1].result(timeout=self.timeout_s)

    def close(self) -> None:
        """Drop a step made ahead. No wait: on an error its calls may be stuck in an actor that the runtime's
        shutdown, which follows, kills; they then fail and the thread ends."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RolloutStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _make(self, step: int, stale: bool) -> StepInputs:
        batch = next(self.batches)
        inputs = StepInputs(batch, metrics=self.batches.metrics(), data_state=self.batches.state())
        if self.plan is None:
            return inputs
        plan = self.plan
        captions = self.runtime.rollout.describe(batch, plan, self.seed_of(step))
        inputs.scored = self.runtime.reward.score(batch, captions, plan.group_size)
        inputs.rollout = Rollout(captions, plan.group_size, inputs.scored.total, off_policy=stale)
        inputs.metrics.update(inputs.scored.metrics)
        inputs.metrics["train/caption_tokens"] = sum(len(i) for i in captions.ids) / len(captions)
        if self._pool is not None:
            inputs.metrics["async/staleness"] = float(stale)
        return inputs
