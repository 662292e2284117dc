"""The reward plugin contract.

A reward plugin is a callable that takes a `RewardInput` (one row per generated caption) and returns one
score per caption: a float, or `None` for "not applicable" (excluded from that caption's weighted total,
never counted as 0). It may be

- a function `f(batch, **options) -> list[float | None]` (options come from the recipe entry),
- an `async def` function of the same shape (run concurrently with the other plugins),
- a class whose constructor takes the options and whose instances are called (sync or async) with the
  batch: for plugins that keep state between steps (a client, a cache, a process pool).

A plugin may return a `RewardOutput` instead of a plain list to report captions it failed to score
(`failures`) and extra per-step metrics (logged as `reward/<name>/<key>`). An exception or a timeout fails
the whole plugin for that step: every caption gets `None`, the failure is counted and logged, and the run
goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class RewardInput:
    """What every reward plugin sees. Rows are captions; a region has `group_size` consecutive rows.

    Per caption (length N): `captions`, `caption_ids`, `region`, `references`, `columns[key]`.
    Per region (length B, indexed by `region[i]`): `images` (uint8 [B,3,H,W]) and `masks` (bool [B,H,W]).
    `segmentation` holds the EMA segmenter's results per caption (`mask_iou`, `mask_soft_iou`: float [N])
    when the reward worker ran it (it does whenever it owns the EMA model).
    """

    captions: list[str]
    caption_ids: list[Tensor]
    region: Tensor
    images: Tensor
    masks: Tensor
    references: list[list[str]]
    group_size: int = 1
    columns: dict[str, list[Any]] = field(default_factory=dict)
    segmentation: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class RewardOutput:
    """A plugin's answer when plain scores are not enough: `failures` counts captions that should have been
    scored but were not (timeouts, unparsable answers); `metrics` are per-step floats for the logs."""

    scores: list[float | None]
    failures: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
