"""`mask_iou`: how well the EMA segmenter finds the region again from the caption (the dual loop's reward).

The reward worker, which owns the EMA weights, segments every caption before the plugins run (each image
encoded once for all the captions of its regions) and hands the IoUs over in `batch.segmentation`; this
plugin picks the thresholded or the soft IoU and logs the other beside it.
"""

from __future__ import annotations

from rewards.base import RewardInput, RewardOutput


class MaskIoU:
    def __init__(self, soft: bool = False):
        """`soft`: reward the soft IoU (sigmoid probabilities) instead of the thresholded one; smoother
        when masks are small or the segmenter is unsure."""
        self.soft = soft

    def __call__(self, batch: RewardInput) -> RewardOutput:
        seg = batch.segmentation
        if seg is None:
            raise RuntimeError("mask_iou needs the EMA segmenter's results: it runs inside the RewardWorker")
        hard, soft = seg["mask_iou"], seg["mask_soft_iou"]
        chosen = soft if self.soft else hard
        other = ("hard", hard) if self.soft else ("soft", soft)
        return RewardOutput(chosen.tolist(), metrics={other[0]: other[1].float().mean().item()} if len(hard) else {})
