"""What an objective asks of the rollout (`RolloutPlan`) and what it gets back (`Rollout`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from dualrl.model.grounded_vlm import Captions


@dataclass(frozen=True)
class RolloutPlan:
    """How captions are drawn for a step: `group_size` per region (consecutive rows), greedy or sampled (whose
    weights draw them is the objective's `rollout_weights`); with `greedy_first`, each group's first caption is
    greedy and the others sampled (GRPO's greedy baseline)."""

    group_size: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    greedy_first: bool = False


@dataclass
class Rollout:
    """One step's captions (region r owns rows r*G .. r*G+G-1) and their weighted total rewards."""

    captions: Captions
    group_size: int = 1
    rewards: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None  # set by the first of several updates on this rollout (GRPO)
    off_policy: bool = False  # sampled by weights older than the learner's (runtime.async_rollout)

    @property
    def ids(self) -> list[torch.Tensor]:
        return self.captions.ids

    @property
    def region(self) -> torch.Tensor:
        return torch.arange(len(self.captions) // self.group_size).repeat_interleave(self.group_size)

    def regions(self, lo: int, hi: int) -> Rollout:
        """The captions (and rewards) of regions lo .. hi-1."""
        a, b = lo * self.group_size, hi * self.group_size
        return Rollout(
            self.captions.part(a, b),
            self.group_size,
            None if self.rewards is None else self.rewards[a:b],
            None if self.old_logprobs is None else self.old_logprobs[a:b],
            self.off_policy,
        )


def micro_batches(batch: dict, rollout: Rollout | None, chunks: int) -> list[tuple[dict, Rollout | None]]:
    """A step's regions in `chunks` consecutive parts (sizes differing by at most one), each with its own
    captions: gradient accumulation runs the objective on each and steps the optimizer once."""
    n = len(batch["masks"])
    chunks = max(1, min(chunks, n))
    if chunks == 1:  # the batch itself (its images keep the identity encodings are kept by); a Rollout of its own
        return [(batch, None if rollout is None else rollout.regions(0, n))]
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        # views of the batch's rows lo..hi-1: by them a part finds its rows of the batch's kept encoding
        sub = {k: v[lo:hi] if isinstance(v, (list, torch.Tensor)) and len(v) == n else v for k, v in batch.items()}
        parts.append((sub, None if rollout is None else rollout.regions(lo, hi)))
    return parts
