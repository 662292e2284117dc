"""Mask losses and mask metrics, matching Sa2VA's training objective.

Sa2VA (sa2va_4b config, same in 1B/8B and v2) supervises SAM2's 256x256 low-res logits with

    loss_mask = 2.0 * sum_i BCEWithLogits(x_i, t_i) / (N * P + 1e-4)
    loss_dice = 0.5 * sum_n [1 - (2 * sum p*t + 1) / (sum p + sum t + 1)] / (N + 1e-4),   p = sigmoid(x)

where N is the number of masks and the sums over i run over P = 12,544 points per mask chosen by
PointRend / Mask2Former uncertainty sampling. Everything here is a pure tensor function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dualrl.model.transfer import rand, upload

# Sa2VA reductions: dice sum / (N + 1e-4), BCE sum / (N * num_points + 1e-4).
_REDUCTION_EPS = 1e-4
# Sa2VA dice: naive (not squared), eps = 1 in numerator and denominator.
_DICE_EPS = 1.0


def point_sample(x: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample a feature map at normalised points.

    ``coords`` are (x, y) in [0, 1]^2 over the whole map; they are mapped to grid_sample's [-1, 1] by
    ``g = 2 * c - 1`` and sampled with ``align_corners=False`` and zero padding (the PointRend /
    Mask2Former helper that Sa2VA uses). With ``align_corners=False`` a coordinate c lands on pixel
    position ``c * W - 0.5``, so points within half a pixel of the border blend with the zero padding.

    Args:
        x: ``[N, C, H, W]`` feature map.
        coords: ``[N, P, 2]`` points in [0, 1], (x, y) order.

    Returns:
        ``[N, C, P]`` sampled values.
    """
    grid = (2.0 * coords - 1.0).to(x.dtype).unsqueeze(2)  # [N, P, 1, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def _uniform_points(n: int, p: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``[n, p, 2]`` uniform points in [0, 1) on `device`, reproducible from `generator` (see `transfer.rand`)."""
    return rand((n, p, 2), generator, device)


@torch.no_grad()
def sample_points_by_uncertainty(
    logits: Tensor,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose points where the mask logit is least certain, plus uniform ones (PointRend / Mask2Former).

    1. Draw ``M = int(num_points * oversample_ratio)`` uniform candidates c_m in [0, 1]^2.
    2. Uncertainty u_m = -|x(c_m)| with x bilinearly sampled from ``logits``.
    3. Keep the ``K = int(importance_sample_ratio * num_points)`` candidates with the largest u_m.
    4. Append ``num_points - K`` fresh uniform points.

    Sa2VA defaults: 37,632 candidates, 9,408 kept, 3,136 fresh. Runs under ``no_grad``: point
    selection is not differentiated (as in Mask2Former / Sa2VA).

    Args:
        logits: ``[N, 1, H, W]`` or ``[N, H, W]`` mask logits.
        num_points: points per mask, P.
        oversample_ratio: candidate multiplier, >= 1.
        importance_sample_ratio: fraction of the P points chosen by uncertainty, in [0, 1].
        generator: optional torch generator for reproducible draws.

    Returns:
        ``[N, P, 2]`` float32 points in [0, 1], (x, y) order; the K importance points come first.
    """
    if oversample_ratio < 1.0:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    n = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_important = int(importance_sample_ratio * num_points)
    num_random = num_points - num_important

    candidates = _uniform_points(n, num_candidates, logits.device, generator)
    uncertainty = -point_sample(logits, candidates).squeeze(1).abs()  # [N, M]
    top = uncertainty.topk(num_important, dim=1).indices  # [N, K]
    important = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    fresh = _uniform_points(n, num_random, logits.device, generator)
    return torch.cat([important, fresh], dim=1)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sa2VA BCE: ``sum_{n,i} BCEWithLogits(x_ni, t_ni) / (N * P + 1e-4)`` (unweighted).

    ``BCEWithLogits(x, t) = log(1 + exp(x)) - x * t``; targets may be soft (in [0, 1]).

    Args:
        logits: ``[N, P]`` logits at the sampled points (or all pixels).
        targets: ``[N, P]`` targets in [0, 1].
    """
    n, p = logits.shape
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum")
    return loss / (n * p + _REDUCTION_EPS)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sa2VA naive dice (eps = 1): ``sum_n [1 - (2 S_pt + 1) / (S_p + S_t + 1)] / (N + 1e-4)`` (unweighted).

    With ``p = sigmoid(x)``, ``S_pt = sum_i p_i t_i``, ``S_p = sum_i p_i``, ``S_t = sum_i t_i`` per mask.

    Args:
        logits: ``[N, P]`` logits at the sampled points (or all pixels).
        targets: ``[N, P]`` targets in [0, 1].
    """
    probs = logits.sigmoid()
    targets = targets.to(probs.dtype)
    numerator = 2.0 * (probs * targets).sum(-1) + _DICE_EPS
    denominator = probs.sum(-1) + targets.sum(-1) + _DICE_EPS
    return (1.0 - numerator / denominator).sum() / (logits.shape[0] + _REDUCTION_EPS)


def _resize_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, H, W]`` -> ``[N, h, w]`` float, nearest neighbour (Sa2VA resizes GT to the logits' size)."""
    masks = masks.float().unsqueeze(1)
    if masks.shape[-2:] != size:
        masks = F.interpolate(masks, size=size, mode="nearest")
    return masks.squeeze(1)


def mask_losses(
    pred_logits: Tensor,
    gt_masks: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    bce_weight: float = 2.0,
    dice_weight: float = 0.5,
    point_sampling: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Sa2VA mask loss: weighted BCE and dice on uncertainty-sampled points.

    GT masks are nearest-resized to the logits' size (h, w). With ``point_sampling`` both logits and the
    float GT are bilinearly sampled at ``sample_points_by_uncertainty`` points (GT turns soft there),
    P = ``num_points``; otherwise every pixel is used, P = h * w. Then

        loss_mask = bce_weight  * sigmoid_bce_loss(x, t)   # sum / (N * P + 1e-4)
        loss_dice = dice_weight * dice_loss(x, t)          # sum / (N + 1e-4)

    Losses are computed in at least float32 (bf16 sums over 12,544 points lose digits).

    Args:
        pred_logits: ``[N, h, w]`` mask logits (SAM2 low-res, 256x256 in Sa2VA).
        gt_masks: ``[N, H, W]`` bool or {0, 1} float masks.
        num_points, oversample_ratio, importance_sample_ratio: see ``sample_points_by_uncertainty``.
        bce_weight, dice_weight: loss weights (Sa2VA: 2.0 and 0.5).
        point_sampling: sample points (Sa2VA) or use all pixels.
        generator: optional generator for the point draws.

    Returns:
        ``{"loss_mask": scalar, "loss_dice": scalar}``. With N = 0 both are zeros still attached to
        ``pred_logits``' graph, so every rank runs the same backward (Sa2VA's placeholder masks, loss x 0).
    """
    if pred_logits.dim() != 3 or gt_masks.dim() != 3:
        raise ValueError(
            f"pred_logits and gt_masks must be [N, h, w] and [N, H, W], got {tuple(pred_logits.shape)} "
            f"and {tuple(gt_masks.shape)}"
        )
    if pred_logits.shape[0] != gt_masks.shape[0]:
        raise ValueError(f"mask count differs: {pred_logits.shape[0]} logits vs {gt_masks.shape[0]} GT masks")
    if pred_logits.shape[0] == 0:
        zero = pred_logits.sum() * 0.0
        return {"loss_mask": zero, "loss_dice": zero.clone()}

    logits = pred_logits.to(torch.promote_types(pred_logits.dtype, torch.float32))
    gt = upload(_resize_nearest(gt_masks, tuple(logits.shape[-2:])), logits.device).to(logits.dtype)
    if point_sampling:
        coords = sample_points_by_uncertainty(
            logits, num_points, oversample_ratio, importance_sample_ratio, generator=generator
        )
        logits = point_sample(logits.unsqueeze(1), coords).squeeze(1)
        gt = point_sample(gt.unsqueeze(1), coords).squeeze(1)
    else:
        logits, gt = logits.flatten(1), gt.flatten(1)
    return {
        "loss_mask": bce_weight * sigmoid_bce_loss(logits, gt),
        "loss_dice": dice_weight * dice_loss(logits, gt),
    }


def _upsample_logits(pred_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, h, w]`` -> ``[N, H, W]`` float32, bilinear with ``align_corners=False`` (SAM2 postprocessing)."""
    logits = pred_logits.float().unsqueeze(1)
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.squeeze(1)


@torch.no_grad()
def mask_iou(pred_logits: Tensor, gt: Tensor, threshold: float = 0.0) -> Tensor:
    """Hard IoU per mask: ``|P & G| / |P | G|`` with ``P = upsample(x) > threshold``.

    Logits are upsampled bilinearly (``align_corners=False``) to the GT size first. A float GT counts as
    foreground where > 0.5. Two empty masks agree perfectly: IoU = 1 when the union is empty. A mask whose
    upsampled logits hold a NaN gets IoU NaN: thresholding would read NaN as background and score broken
    weights 0, or 1 against an empty mask.

    Args:
        pred_logits: ``[N, h, w]`` mask logits.
        gt: ``[N, H, W]`` bool or {0, 1} float masks.
        threshold: logit threshold (0 = probability 0.5).

    Returns:
        ``[N]`` float32 IoUs in [0, 1], or NaN.
    """
    logits = _upsample_logits(pred_logits, tuple(gt.shape[-2:])).flatten(1)
    pred = logits > threshold
    target = (gt.to(pred.device) > 0.5).flatten(1)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))
    return torch.where(logits.isnan().any(-1), torch.full_like(iou, float("nan")), iou)


def soft_mask_iou(pred_logits: Tensor, gt: Tensor) -> Tensor:
    """Soft (probabilistic) Jaccard per mask: ``S_pt / (S_p + S_t - S_pt)``, ``p = sigmoid(upsample(x))``.

    Chosen over ``sum min(p, t) / sum max(p, t)`` because the product form is smooth everywhere (no kinks
    at p = t), matches dice's ``S_pt`` and reduces to the hard IoU when p is binary. Logits are upsampled
    like ``mask_iou``; a float GT is used as given (soft targets allowed). A zero denominator (p and t
    both all-zero) gives 1; a NaN one (a NaN in the logits or the GT) gives NaN, never 1. Differentiable in
    ``pred_logits``.

    Args:
        pred_logits: ``[N, h, w]`` mask logits.
        gt: ``[N, H, W]`` bool or [0, 1] float masks.

    Returns:
        ``[N]`` float32 soft IoUs in [0, 1], or NaN.
    """
    probs = _upsample_logits(pred_logits, tuple(gt.shape[-2:])).sigmoid().flatten(1)
    target = upload(gt, probs.device).to(probs.dtype).flatten(1)
    inter = (probs * target).sum(-1)
    union = probs.sum(-1) + target.sum(-1) - inter
    tiny = torch.finfo(union.dtype).tiny
    # clamp keeps a NaN union NaN; only a union that is exactly 0 counts as "both empty".
    return torch.where(union == 0, torch.ones_like(union), inter / union.clamp(min=tiny))
