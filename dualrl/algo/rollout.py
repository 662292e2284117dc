"""What an objective asks of the rollout (`RolloutPlan`) and what it gets back (`Rollout`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualrl.model.grounded_vlm import Captions


@dataclass(frozen=True)
class RolloutPlan:
    """How captions are drawn for a step: `group_size` per region (consecutive rows), greedy or sampled, by
    the EMA teacher or by the current policy."""

    weights: str = "ema"  # "ema" | "policy"
    group_size: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None


@dataclass
class Rollout:
    """One step's captions (region r owns rows r*G .. r*G+G-1) and their weighted total rewards."""

    captions: Captions
    group_size: int = 1
    rewards: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None  # set by the first of several updates on this rollout (GRPO)

    @property
    def ids(self) -> list[torch.Tensor]:
        return self.captions.ids

    @property
    def region(self) -> torch.Tensor:
        return torch.arange(len(self.captions) // self.group_size).repeat_interleave(self.group_size)
