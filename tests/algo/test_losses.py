"""Tests for dualrl.algo.losses (Sa2VA mask losses, point sampling, IoU metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from dualrl.algo.losses import (
    dice_loss,
    mask_iou,
    mask_losses,
    point_sample,
    sample_points_by_uncertainty,
    sigmoid_bce_loss,
    soft_mask_iou,
)


def _bce(x: float, t: float) -> float:
    return math.log(1.0 + math.exp(x)) - x * t


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# 2x2 logit map and GT used by the hand-computed cases.
LOGITS = [2.0, -1.0, 0.0, 3.0]
TARGETS = [1.0, 0.0, 1.0, 0.0]


def test_dense_bce_and_dice_match_hand_computation() -> None:
    """Dense 2x2 map: loss_mask = 2 * sum BCE / (4 + 1e-4), loss_dice = 0.5 * dice / (1 + 1e-4)."""
    pred = torch.tensor(LOGITS, dtype=torch.float64).view(1, 2, 2)
    gt = torch.tensor(TARGETS, dtype=torch.float64).view(1, 2, 2)
    out = mask_losses(pred, gt, point_sampling=False)

    # BCE(x, t) = log(1 + e^x) - x t: 0.126928 + 0.313262 + 0.693147 + 3.048587 = 4.181924
    bce_sum = _bce(2.0, 1.0) + _bce(-1.0, 0.0) + _bce(0.0, 1.0) + _bce(3.0, 0.0)
    assert bce_sum == pytest.approx(4.181924, abs=1e-6)
    expected_mask = 2.0 * bce_sum / (1 * 4 + 1e-4)

    p = [_sigmoid(x) for x in LOGITS]  # 0.880797, 0.268941, 0.5, 0.952574
    s_pt = p[0] * 1.0 + p[2] * 1.0  # 1.380797
    s_p = sum(p)  # 2.602313
    s_t = 2.0
    dice = 1.0 - (2.0 * s_pt + 1.0) / (s_p + s_t + 1.0)  # 1 - 3.761594 / 5.602313 = 0.328564
    assert dice == pytest.approx(0.328564, abs=1e-6)
    expected_dice = 0.5 * dice / (1 + 1e-4)

    assert out["loss_mask"].item() == pytest.approx(expected_mask, rel=1e-12)
    assert out["loss_dice"].item() == pytest.approx(expected_dice, rel=1e-12)


def test_reductions_divide_sums_by_count_plus_1e_4() -> None:
    """BCE = sum / (N*P + 1e-4) and dice = sum over masks / (N + 1e-4), not plain means."""
    torch.manual_seed(0)
    n, p = 3, 5
    x = torch.randn(n, p, dtype=torch.float64)
    t = (torch.rand(n, p, dtype=torch.float64) > 0.5).to(torch.float64)
    bce_elems = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert sigmoid_bce_loss(x, t).item() == pytest.approx(bce_elems.sum().item() / (n * p + 1e-4), rel=1e-12)
    # Distinguishable from the plain mean at this precision: ratio 15 / 15.0001.
    assert sigmoid_bce_loss(x, t).item() != pytest.approx(bce_elems.mean().item(), rel=1e-7)

    probs = x.sigmoid()
    per_mask = 1 - (2 * (probs * t).sum(1) + 1) / (probs.sum(1) + t.sum(1) + 1)
    assert dice_loss(x, t).item() == pytest.approx(per_mask.sum().item() / (n + 1e-4), rel=1e-12)


def test_gt_is_nearest_resized_to_prediction_size() -> None:
    """A 4x4 GT becomes 2x2 by nearest (source pixels (0,0), (0,2), (2,0), (2,2)), not by area or vote."""
    gt4 = torch.tensor(
        [
            [1, 0, 0, 1],  # block (0,0): only its top-left is 1 -> 1 (area would give 0.25)
            [0, 0, 1, 1],  # block (0,1): 3 of 4 are 1 but its top-left is 0 -> 0
            [0, 0, 1, 0],  # block (1,0): empty -> 0
            [0, 0, 0, 0],  # block (1,1): only its top-left is 1 -> 1
        ],
        dtype=torch.bool,
    ).unsqueeze(0)
    expected2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).unsqueeze(0)
    pred = torch.tensor(LOGITS, dtype=torch.float64).view(1, 2, 2)
    got = mask_losses(pred, gt4, point_sampling=False)
    want = mask_losses(pred, expected2, point_sampling=False)
    assert torch.equal(got["loss_mask"], want["loss_mask"])
    assert torch.equal(got["loss_dice"], want["loss_dice"])


def test_point_sample_hits_pixel_centres_and_interpolates() -> None:
    """point_sample maps (x, y) in [0,1] with align_corners=False: pixel j's centre is (j + 0.5) / W."""
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    w, h = 3, 2
    xy = [[0.5 / w, 0.5 / h], [2.5 / w, 1.5 / h], [1.0 / w, 0.5 / h], [1.5 / w, 1.0 / h]]
    coords = torch.tensor([xy], dtype=torch.float64)
    out = point_sample(x, coords)
    assert out.shape == (1, 1, 4)
    # (col 0, row 0) = 0; (col 2, row 1) = 5; halfway between cols 0 and 1 = 0.5; centre of the 4 middle = 2.5
    assert out.flatten().tolist() == pytest.approx([0.0, 5.0, 0.5, 2.5], abs=1e-12)


def test_sampled_points_shape_range_and_count() -> None:
    """N x P x 2 points in [0, 1]: int(0.75 * P) importance points plus P - that fresh ones, for any P."""
    logits = torch.randn(3, 1, 16, 16)
    for num_points in (100, 10, 1):
        pts = sample_points_by_uncertainty(logits, num_points=num_points)
        assert pts.shape == (3, num_points, 2)
        assert pts.min() >= 0 and pts.max() <= 1
    assert sample_points_by_uncertainty(logits[:, 0], num_points=7).shape == (3, 7, 2)  # [N, H, W] accepted
    assert sample_points_by_uncertainty(logits, num_points=8, importance_sample_ratio=0.0).shape == (3, 8, 2)
    assert sample_points_by_uncertainty(logits, num_points=8, importance_sample_ratio=1.0).shape == (3, 8, 2)


def _ring_band_fraction(pts: torch.Tensor, size: int, lo: int, hi: int) -> float:
    """Fraction of points within one pixel (Chebyshev) of the square outline through cells lo..hi."""
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    px = pts[..., 0] * size - 0.5  # pixel coordinates, align_corners=False
    py = pts[..., 1] * size - 0.5
    dist = ((px - centre).abs().maximum((py - centre).abs()) - half).abs()
    return (dist < 1.0).float().mean().item()


def test_importance_points_concentrate_on_the_uncertain_ring() -> None:
    """With logits +10 except a ring of zeros, the uncertainty-chosen points lie mostly on the ring."""
    size, lo, hi = 32, 8, 23
    logits = torch.full((2, size, size), 10.0)
    logits[:, lo : hi + 1, lo] = logits[:, lo : hi + 1, hi] = 0.0
    logits[:, lo, lo : hi + 1] = logits[:, hi, lo : hi + 1] = 0.0
    gen = torch.Generator().manual_seed(0)
    pts = sample_points_by_uncertainty(
        logits, num_points=64, oversample_ratio=10.0, importance_sample_ratio=0.75, generator=gen
    )
    important, fresh = pts[:, :48], pts[:, 48:]
    uniform = torch.rand(2, 4096, 2, generator=gen)
    # The ring band covers ~12 % of the map; zero padding at the border is the other (weaker) uncertain zone.
    assert _ring_band_fraction(uniform, size, lo, hi) < 0.2
    assert _ring_band_fraction(important, size, lo, hi) > 0.75
    assert _ring_band_fraction(fresh, size, lo, hi) < 0.5


def test_point_sampling_is_deterministic_with_a_generator() -> None:
    """Same seed -> identical points and losses; another seed -> different points."""
    logits = torch.randn(2, 16, 16)
    gt = torch.rand(2, 32, 32) > 0.5

    def run(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed
        pts = sample_points_by_uncertainty(logits, num_points=50, generator=gen(seed))
        losses = mask_losses(logits, gt, num_points=50, generator=gen(seed))
        return pts, losses

    (p1, l1), (p2, l2), (p3, _) = run(1), run(1), run(2)
    assert torch.equal(p1, p2)
    assert torch.equal(l1["loss_mask"], l2["loss_mask"]) and torch.equal(l1["loss_dice"], l2["loss_dice"])
    assert not torch.equal(p1, p3)


def test_point_sampled_losses_are_close_to_dense_and_differentiable() -> None:
    """Uniform points on smooth maps approximate the dense losses; gradients reach the logits."""
    torch.manual_seed(0)
    # Smooth logits and a disk GT: bilinear sampling then differs from the pixel grid only near edges.
    pred = torch.nn.functional.interpolate(torch.randn(2, 1, 4, 4) * 3, size=(32, 32), mode="bilinear")
    pred = pred.squeeze(1).requires_grad_()
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    gt = (((yy - 30) ** 2 + (xx - 34) ** 2) < 20**2).expand(2, 64, 64)
    out = mask_losses(pred, gt, num_points=4000, importance_sample_ratio=0.0)  # uniform points: unbiased
    dense = mask_losses(pred, gt, point_sampling=False)
    assert out["loss_mask"].item() == pytest.approx(dense["loss_mask"].item(), rel=0.1)
    assert out["loss_dice"].item() == pytest.approx(dense["loss_dice"].item(), rel=0.1)
    (out["loss_mask"] + out["loss_dice"]).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert sample_points_by_uncertainty(pred).requires_grad is False


def test_no_masks_gives_graph_connected_zeros() -> None:
    """N = 0: both losses are 0, require grad and backpropagate (zero grad) so every rank runs backward."""
    pred = torch.zeros(0, 8, 8, requires_grad=True)
    out = mask_losses(pred, torch.zeros(0, 16, 16, dtype=torch.bool))
    for value in out.values():
        assert value.item() == 0.0 and value.requires_grad
    (out["loss_mask"] + out["loss_dice"]).backward()
    assert pred.grad is not None and pred.grad.shape == (0, 8, 8)


def test_mask_count_mismatch_is_an_error() -> None:
    """Different N for logits and GT raises a ValueError naming both counts."""
    with pytest.raises(ValueError, match="2 logits vs 3"):
        mask_losses(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4))


def test_mask_iou_hand_cases() -> None:
    """IoU: perfect 1, disjoint 0, overlap 1 of union 3 -> 1/3, both empty 1; logits > 0 is foreground."""
    logit = {True: 5.0, False: -5.0}

    def logits_of(mask: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[logit[bool(v)] for v in row] for row in mask])

    preds = [[[1, 1], [0, 0]], [[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]]
    gts = [[[1, 1], [0, 0]], [[0, 0], [0, 1]], [[0, 1], [0, 1]], [[0, 0], [0, 0]]]
    pred = torch.stack([logits_of(m) for m in preds])
    gt = torch.tensor(gts, dtype=torch.bool)
    assert mask_iou(pred, gt).tolist() == pytest.approx([1.0, 0.0, 1 / 3, 1.0])
    # A float GT counts where > 0.5; the threshold moves the decision boundary.
    assert mask_iou(pred, gt.float()).tolist() == pytest.approx([1.0, 0.0, 1 / 3, 1.0])
    assert mask_iou(pred, gt, threshold=10.0).tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])


def test_mask_iou_upsamples_logits_bilinearly() -> None:
    """Logits [[5,-5],[-5,5]] upsample (bilinear, align_corners=False) to a 2x2-block checkerboard."""
    pred = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])
    # Output pixel 1 samples source 0.25 -> 5*0.75 - 5*0.25 = 2.5 > 0; pixel 2 samples 0.75 -> -2.5.
    block = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    gt = block.repeat_interleave(2, 0).repeat_interleave(2, 1).unsqueeze(0)
    assert mask_iou(pred, gt).tolist() == [1.0]


def test_soft_mask_iou_hand_cases() -> None:
    """Soft IoU = S_pt / (S_p + S_t - S_pt): logits 0 vs GT [1, 0] -> 0.5 / 1.5; saturated -> hard IoU."""
    pred = torch.zeros(1, 1, 2, requires_grad=True)
    gt = torch.tensor([[[1.0, 0.0]]])
    iou = soft_mask_iou(pred, gt)
    assert iou.tolist() == pytest.approx([0.5 / (1.0 + 1.0 - 0.5)])
    iou.sum().backward()
    assert pred.grad is not None and pred.grad[0, 0, 0] > 0 > pred.grad[0, 0, 1]

    sat = torch.tensor([[[50.0, 50.0], [-50.0, -50.0]]])
    gt_half = torch.tensor([[[0, 1], [0, 1]]], dtype=torch.bool)
    assert soft_mask_iou(sat, gt_half).tolist() == pytest.approx(mask_iou(sat, gt_half).tolist())
    # Both (numerically) empty: p underflows to 0 at -200 in float32 -> defined as 1.
    assert soft_mask_iou(torch.full((1, 2, 2), -200.0), torch.zeros(1, 2, 2)).tolist() == [1.0]
