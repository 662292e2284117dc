"""The evaluation measures, as small tensor functions shared by the evaluation during training and the command line.

One path from mask logits to a score: low-res logits -> the mask's resolution (bilinear, `align_corners=False`,
SAM2's post-processing) -> threshold at logit 0 -> intersection and union counts per query -> a mean of per-query
IoUs (`ref_miou`, `cycle_miou`) or a ratio of totals (`ref_ciou`). The names are those of docs/eval.md.

The command line computes its IoUs here. During training the workers measure each region's IoU themselves with
`dualrl.algo.losses.mask_iou` (the reward's own measure: the same upsampling and threshold) and
`dualrl.eval.training` averages those.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


class MeteorUnavailable(RuntimeError):
    """nltk or its WordNet corpus is missing; the message says how to install it."""


def binarize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, h, w]`` mask logits -> ``[N, H, W]`` bool masks: bilinear to ``size``, then logit > 0."""
    up = F.interpolate(logits[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up[:, 0] > 0


def to_file_resolution(logits: Tensor, hw: tuple[int, int], aspect: str, square: int) -> Tensor:
    """``[h, w]`` logits of the working square -> the bool mask at the file's ``hw`` = (height, width).

    A squashed square (``aspect="squash"``) is resized whole; a padded one (``"pad"``) is first brought to the
    square's size and cropped to where the image sits (top left), as the loader placed it.
    """
    height, width = hw
    logits = logits[None].float()
    if aspect == "pad":
        scale = square / max(height, width)
        logits = F.interpolate(logits[:, None], size=(square, square), mode="bilinear", align_corners=False)[:, 0]
        logits = logits[..., : max(1, round(height * scale)), : max(1, round(width * scale))]
    return binarize(logits, hw)[0]


def intersection_union(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Per mask ``|P & G|`` and ``|P | G|`` as float64 counts, of bool ``pred`` and ``gt`` shaped ``[N, ...]``."""
    gt = gt.to(pred.device).bool()
    return (pred & gt).flatten(1).sum(1).double(), (pred | gt).flatten(1).sum(1).double()


def mean_iou(inter: Tensor, union: Tensor) -> float:
    """Mean of the per-query IoUs ``inter / union`` (RefCOCO papers' gIoU); an empty union counts 0."""
    return (inter / union.clamp(min=1)).mean().item()


def cumulative_iou(inter: Tensor, union: Tensor) -> float:
    """Total intersection over total union (RefCOCO papers' cIoU): large masks weigh more."""
    return (inter.sum() / union.sum().clamp(min=1)).item()


def mean_meteor(captions: list[str], references: list[list[str]]) -> float | None:
    """Mean nltk METEOR (`rewards.meteor`, real WordNet) of the captions that have a reference; None when none has.

    Raises:
        MeteorUnavailable: nltk or WordNet is not installed.
    """
    try:
        from rewards.meteor import meteor_scores

        scores = [s for s in meteor_scores(captions, references) if s is not None]
    except (ImportError, RuntimeError) as err:  # rewards.wordnet raises RuntimeError with install instructions
        raise MeteorUnavailable(str(err)) from err
    return sum(scores) / len(scores) if scores else None
