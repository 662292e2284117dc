"""Several Ray actors doing one worker's job: the driver loop calls a group as it calls one worker.

- `LearnerGroup`: N learner actors, one torch.distributed group (dualrl/workers/data_parallel.py). Every rank gets
  the whole step (one copy in the object store) and runs its share; the update and the metrics are the same on
  every rank, so rank 0 answers for the group: it sends weights, evaluates and writes the checkpoint, which holds
  every rank's random state.
- `RolloutGroup`: M rollout actors, a step's regions split among them in consecutive parts.
- `RewardGroup`: M reward actors; each segments the captions of its part of the regions with the EMA (the GPU
  work), then reward worker 0 runs the plugins once over the whole step with those segmentations, so every plugin
  sees the whole batch as it does with one worker.
With one actor each, a group makes the very calls one worker would.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import torch

from dualrl.algo.rollout_data import Rollout, RolloutPlan, micro_batches
from dualrl.model.grounded_vlm import Captions
from dualrl.runtime.ray_calls import Actor, Call, Deadlines
from dualrl.workers.data_parallel import PART_SEED
from rewards.registry import RewardResult

log = logging.getLogger("dualrl")


class LearnerGroup:
    """N learner actors as one learner. Methods not defined here go to rank 0 (reports). When the learners shard
    the weights (`sharding` fsdp), the calls that gather them (evaluation, weights out, checkpoints) go to every
    rank, rank 0 answering."""

    def __init__(
        self, actors: list[Actor], deadlines: Deadlines, backend: str, collective_timeout_s: float, sharding: str
    ):
        self.actors, self.deadlines = actors, deadlines
        self.sharded = sharding == "fsdp" and len(actors) > 1
        if len(actors) > 1:
            address, world = actors[0].rendezvous_address(), len(actors)
            group = (backend, collective_timeout_s, sharding)
            held = self.deadlines.results(
                [a.submit("join_group", address, r, world, *group) for r, a in enumerate(actors)]
            )
            if self.sharded:
                shares = ", ".join(f"{100 * h:.1f} %" for h in held)
                log.info("the learners shard the trainable weights (fsdp); each rank holds: %s", shares)

    def step(
        self, batch: dict, rollout: Rollout | None, generator: torch.Generator, read: bool = True
    ) -> dict[str, float]:
        if len(self.actors) == 1:
            return self.actors[0].step(batch, rollout, generator, read)
        batch_ref, rollout_ref = ray.put(batch), ray.put(rollout)
        calls = [a.submit("step", batch_ref, rollout_ref, generator, read) for a in self.actors]
        metrics = self.deadlines.results(calls)
        return metrics[0]

    def state_dict(self) -> dict:
        """Rank 0's state (the same weights, EMA and optimizer as every rank's) and the other ranks' random state."""
        own = self.submit_all("state_dict")
        results = self.deadlines.results([*own, *(a.submit("rng") for a in self.actors[1:])])
        return {**results[0], "rank_rng": results[len(own) :]}

    def load_state_dict(self, state: dict) -> None:
        """Every rank loads the checkpoint; rank r > 0 takes the random state saved for it, if the saving run had
        that rank (a run resumed with more learners gives the new ranks fresh streams)."""
        saved = state.get("rank_rng", [])
        ref = ray.put({k: v for k, v in state.items() if k != "rank_rng"})
        self.deadlines.results([a.submit("load_state_dict", ref) for a in self.actors])
        if len(self.actors) > 1:
            rngs = [saved[r - 1] if r - 1 < len(saved) else None for r in range(1, len(self.actors))]
            self.deadlines.results([a.submit("set_rng", rng) for a, rng in zip(self.actors[1:], rngs)])

    def submit_all(self, name: str, *args: Any) -> list[Call]:
        """Start `name` on rank 0, and on every other rank (which keeps its result) when the learners shard the
        weights; rank 0's call first."""
        if not self.sharded:
            return [self.actors[0].submit(name, *args)]
        refs = [ray.put(a) for a in args]  # one copy in the object store for all ranks
        return [self.actors[0].submit(name, *refs), *(a.submit("follow", name, *refs) for a in self.actors[1:])]

    def _answer(self, name: str, *args: Any) -> Any:
        return self.deadlines.results(self.submit_all(name, *args))[0]

    def describe(self, batch: dict):
        return self._answer("describe", batch)

    def refer(self, batch: dict):
        return self._answer("refer", batch)

    def nonfinite_weights(self) -> list[str]:
        return self._answer("nonfinite_weights")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.actors[0], name)


def _seed(seed: int | None, part: int) -> int | None:
    """Part 0 samples with the step's seed (what one worker does); part j > 0 with its own."""
    return seed if seed is None or part == 0 else seed + PART_SEED * part


class RolloutGroup:
    """M rollout actors: each describes a consecutive part of the step's regions."""

    def __init__(self, actors: list[Actor], deadlines: Deadlines):
        self.actors, self.deadlines = actors, deadlines

    def describe(self, batch: dict, plan: RolloutPlan | None = None, seed: int | None = None) -> Captions:
        if len(self.actors) == 1:
            return self.actors[0].describe(batch, plan, seed)
        parts = micro_batches(batch, None, len(self.actors))
        calls = [
            a.submit("describe", part, plan, _seed(seed, j)) for j, (a, (part, _)) in enumerate(zip(self.actors, parts))
        ]
        return Captions.join(self.deadlines.results(calls))

    def load_weights(self, ref: ray.ObjectRef) -> list[Call]:
        return [a.submit("load_weights", ref) for a in self.actors]


class RewardGroup:
    """M reward actors: the EMA segmentation split by regions, the plugins once on reward worker 0."""

    def __init__(self, actors: list[Actor], deadlines: Deadlines):
        self.actors, self.deadlines = actors, deadlines

    def score(self, batch: dict, captions: Captions, group_size: int = 1) -> RewardResult:
        if len(self.actors) == 1:
            return self.actors[0].score(batch, captions, group_size)
        parts = micro_batches(batch, Rollout(captions, group_size), len(self.actors))
        calls = [
            a.submit("segment", part, rollout.ids, rollout.region) for a, (part, rollout) in zip(self.actors, parts)
        ]
        segments = self.deadlines.results(calls)
        merged = {k: torch.cat([s[k] for s in segments]) for k in segments[0]}
        return self.actors[0].score(batch, captions, group_size, merged)

    def load_weights(self, ref: ray.ObjectRef) -> list[Call]:
        return [a.submit("load_weights", ref) for a in self.actors]

    def close(self) -> None:
        self.deadlines.results([a.submit("close") for a in self.actors])
