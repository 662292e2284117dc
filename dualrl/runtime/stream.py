"""Each step's inputs for the driver loop: the batch, its captions and rewards, and the data position after it.

With `ahead` (`runtime.async_rollout`), step t+1's captions and rewards are made in a background thread while the
learner trains on step t: the rollout and reward workers work beside the learner instead of waiting for it. They
use the weights of the last sync, one step older than the learner's (`async/staleness` 1; the first step's are
made in time, 0). `settle` waits for the step ahead to finish: the driver calls it before a sync and an evaluation,
so the weights a step ahead is made with, and so its results, do not depend on timing. A step made ahead but not
taken (the run stopped) is dropped; the data position saved is that of the last step taken, so a resume draws
the dropped batch again. Its captions and rewards go into the checkpoint (`ahead_state`), though: they were made
with weights one sync older than the checkpoint's, which a resume no longer has, so the resumed run takes them
(`restore`) rather than making that step again, and logs what an uninterrupted run logs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dualrl.algo.rollout_data import Rollout, RolloutPlan
from dualrl.model.grounded_vlm import Captions
from rewards.registry import RewardResult

if TYPE_CHECKING:
    from dualrl.recipe.run import RuntimeSpec

log = logging.getLogger(__name__)


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
        self._saved: dict | None = None  # a checkpoint's step made ahead, taken in place of making it again

    def take(self, step: int, last: int) -> StepInputs:
        """Step `step`'s inputs (made ahead during the previous step, or now); starts step+1's when ahead and
        `step` < `last`."""
        if self._ahead is not None and self._ahead[0] == step:
            inputs = self._ahead[1].result(timeout=self.timeout_s)
        elif self._saved is not None and self._saved["step"] == step:
            inputs = self._from_saved(self._saved)
        else:
            self.settle()
            inputs = self._make(step, stale=False)
        self._ahead, self._saved = None, None
        if self._pool is not None and step < last:
            self._ahead = (step + 1, self._pool.submit(self._make, step + 1, True))
        return inputs

    def settle(self) -> None:
        """Wait until the step ahead (if any) is made; it stays to be taken."""
        if self._ahead is not None:
            self._ahead[1].result(timeout=self.timeout_s)

    def ahead_state(self, step: int) -> dict | None:
        """Step `step + 1` as made ahead (waited for), in plain containers for a checkpoint of step `step`; None
        when no step is ahead or it has no rollout."""
        if self._ahead is None or self._ahead[0] != step + 1:
            return None
        made = self._ahead[1].result(timeout=self.timeout_s)
        if made.rollout is None:
            return None
        captions, scored = made.rollout.captions, made.scored
        return {
            "step": step + 1,
            "captions": {f: getattr(captions, f) for f in Captions.FIELDS},
            "group_size": made.rollout.group_size,
            "scored": {
                "total": scored.total,
                "scores": scored.scores,
                "metrics": scored.metrics,
                "segmentation": scored.segmentation,
            },
            "metrics": made.metrics,
            "data_state": made.data_state,
        }

    def restore(self, saved: dict | None) -> None:
        """Take `saved` (a checkpoint's `ahead_state`) as its step's captions and rewards when that step comes.
        Only with `runtime.async_rollout` on: a run resumed without it makes every step with current weights."""
        if saved is not None and self._pool is None:
            log.info("the checkpoint's step %d made ahead is not used: runtime.async_rollout is off", saved["step"])
            return
        self._saved = saved

    def close(self) -> None:
        """Drop a step made ahead. No wait: on an error its calls may be stuck in an actor that the runtime's
        shutdown, which follows, kills; they then fail and the thread ends."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RolloutStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _from_saved(self, saved: dict) -> StepInputs:
        """The saved step's captions and rewards with its batch drawn again (the loader resumes where the step
        before left it). A batch that differs from the one they were made for is not given them: that step is
        made again, with a warning."""
        batch = next(self.batches)
        inputs = StepInputs(batch, metrics=self.batches.metrics(), data_state=self.batches.state())
        if inputs.data_state != saved["data_state"]:
            log.warning(
                "step %d: the batch drawn on resume is not the one its saved captions were made for (data state %s, "
                "saved %s): its captions and rewards are made again with the current weights",
                saved["step"],
                inputs.data_state,
                saved["data_state"],
            )
            return self._make(saved["step"], stale=False, drawn=inputs)
        scored = RewardResult(**saved["scored"])
        captions = Captions(**saved["captions"])
        inputs.scored = scored
        inputs.rollout = Rollout(captions, saved["group_size"], scored.total, off_policy=True)
        inputs.metrics = dict(saved["metrics"])  # its timings too: how long that step took in the run that made it
        return inputs

    def _make(self, step: int, stale: bool, drawn: StepInputs | None = None) -> StepInputs:
        if drawn is None:
            batch = next(self.batches)
            drawn = StepInputs(batch, metrics=self.batches.metrics(), data_state=self.batches.state())
        inputs, batch = drawn, drawn.batch
        if self.plan is None:
            return inputs
        plan = self.plan
        t0 = time.perf_counter()
        captions = self.runtime.rollout.describe(batch, plan, self.seed_of(step))
        t1 = time.perf_counter()
        inputs.scored = self.runtime.reward.score(batch, captions, plan.group_size)
        inputs.metrics["step/rollout/ms"] = 1000 * (t1 - t0)  # wall times of the two calls, made ahead or not
        inputs.metrics["step/reward/ms"] = 1000 * (time.perf_counter() - t1)
        inputs.rollout = Rollout(captions, plan.group_size, inputs.scored.total, off_policy=stale)
        inputs.metrics.update(inputs.scored.metrics)
        inputs.metrics["train/caption_tokens"] = sum(len(i) for i in captions.ids) / len(captions)
        if self._pool is not None:
            inputs.metrics["async/staleness"] = float(stale)
        return inputs
