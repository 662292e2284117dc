"""`dualrl.eval.metrics`: logits -> mask -> intersection / union -> IoUs, and METEOR, on hand-computed cases."""

from __future__ import annotations

import sys

import pytest
import torch

from dualrl.eval.metrics import (
    MeteorUnavailable,
    binarize,
    cumulative_iou,
    intersection_union,
    mean_iou,
    mean_meteor,
    to_file_resolution,
)


def test_binarize_upsamples_then_thresholds_at_logit_zero():
    """A 2x2 logit map doubled to 4x4: the positive quadrant stays foreground (bilinear blending leaves the
    pixel next to it at 9/16 * 3 - 2 * 3/16 * 3 > 0); logit 0 is background."""
    logits = torch.tensor([[[3.0, -3.0], [-3.0, 0.0]]])
    assert binarize(logits, (4, 4))[0].tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2
    assert binarize(logits, (2, 2)).tolist() == [[[True, False], [False, False]]]


def test_file_resolution_of_a_padded_square_crops_where_the_image_sits():
    """An image 2 high and 4 wide padded into a 4x4 square fills its top two rows: only those count."""
    logits = torch.full((4, 4), -5.0)
    logits[:2, 1] = 5.0  # foreground in the image's column 1
    logits[2:, :] = 5.0  # foreground in the padding, outside the image
    pred = to_file_resolution(logits, (2, 4), "pad", 4)
    assert pred.tolist() == [[False, True, False, False]] * 2
    squashed = to_file_resolution(logits, (2, 4), "squash", 4)  # the whole square, padding included
    assert squashed.shape == (2, 4) and squashed[1].all()


def test_intersection_union_and_the_two_averages():
    """Query 1: 1 of 2 pixels shared (IoU 1/2); query 2: 3 of 3 (IoU 1). mIoU = 3/4; cIoU = (1 + 3) / (2 + 3)."""
    pred = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    inter, union = intersection_union(pred, gt)
    assert inter.dtype == union.dtype == torch.float64
    assert inter.tolist() == [1.0, 3.0] and union.tolist() == [2.0, 3.0]
    assert mean_iou(inter, union) == pytest.approx(0.75)
    assert cumulative_iou(inter, union) == pytest.approx(0.8)
    assert mean_iou(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)) == 0.0


def test_meteor_averages_the_captions_that_have_a_reference():
    """A caption equal to its reference scores near 1, an empty one 0; a caption without references is left out."""
    got = mean_meteor(["a red circle", "", "a blue square"], [["a red circle"], ["a green star"], []])
    assert got == pytest.approx((mean_meteor(["a red circle"], [["a red circle"]]) + 0.0) / 2)
    assert got > 0.45
    assert mean_meteor(["a red circle"], [[]]) is None


def test_meteor_without_nltk_is_a_meteor_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "rewards.meteor", None)  # `import` of it raises ImportError
    with pytest.raises(MeteorUnavailable):
        mean_meteor(["a red circle"], [["a red circle"]])
