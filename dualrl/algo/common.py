"""Pieces every objective shares: the step's output, Sa2VA's mask terms, and the choice of supervision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dualrl.algo.losses import mask_iou, mask_losses

if TYPE_CHECKING:
    from dualrl.recipe import LossSpec


@dataclass
class StepOutput:
    loss: Tensor
    metrics: dict[str, float | Tensor]  # 0-d tensors stay on the device: the learner reads them in one transfer


def pick_references(batch: dict, rows: list[int], generator: torch.Generator) -> list[str]:
    """One reference per region for referring segmentation: any of its references (RefCOCO keeps several
    sentences per object), drawn with the step's generator so a resumed run draws the same."""
    out = []
    for r in rows:
        refs = batch["references"][r] or [batch["expression"][r]]
        out.append(refs[int(torch.randint(len(refs), (1,), generator=generator))])
    return out


def canonical(batch: dict, rows: list[int]) -> list[str]:
    """The caption target of each region: its first (canonical) reference."""
    return [batch["references"][r][0] if batch["references"][r] else batch["expression"][r] for r in rows]


class MaskTerms:
    """BCE + dice (Sa2VA parity) on a group of predicted masks, plus the training IoU for logging."""

    def __init__(self, loss_spec: LossSpec):
        self.spec = loss_spec

    def __call__(self, logits: Tensor, gt: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        s = self.spec
        terms = mask_losses(
            logits,
            gt,
            num_points=s.num_points,
            oversample_ratio=s.oversample_ratio,
            importance_sample_ratio=s.importance_sample_ratio,
            bce_weight=s.bce_weight,
            dice_weight=s.dice_weight,
            point_sampling=s.point_sampling,
            generator=generator,
        )
        with torch.no_grad():
            iou = mask_iou(logits.detach(), gt).mean() if len(gt) else logits.new_zeros(())
        return terms["loss_mask"], terms["loss_dice"], iou


def ref_rows(batch: dict) -> list[int]:
    return [i for i, e in enumerate(batch["expression"]) if e]


def segment_view(model, batch: dict, feats):
    """What the dual loop segments: the described frames themselves, or, when the batch holds frame pairs
    (SA-V: describe frame t, segment frame t+k), the later frames and their masks. Regions without a pair
    repeat their own frame there, so one pass serves the whole batch."""
    if "seg_images" not in batch:
        return feats, batch["masks"]
    return model.encode_images(batch["seg_images"]), batch["seg_masks"]
