"""RewardWorker: owns the EMA segmenter; scores captions by how well they let it find the region again.

For each caption: EMA `segment(image, caption)` -> mask' -> IoU(mask', original mask). Each image is
encoded once for all the captions of its regions. The cycle IoU is reported whether or not a reward drives
learning (`sft_dual` learns from the differentiable loss and logs this as a diagnostic).
"""

from __future__ import annotations

import torch

from dualrl.algo.losses import mask_iou, soft_mask_iou
from dualrl.model.build import build_model
from dualrl.model.sequence import Ids


class RewardWorker:
    def __init__(self, recipe, device: str, model=None):
        self.model = model if model is not None else build_model(recipe.model, device)
        self.model.eval()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable(state)

    @torch.no_grad()
    def score(self, batch: dict, caption_ids: list[torch.Tensor], image_index: torch.Tensor | None = None) -> dict:
        """`caption_ids[i]` describes region `image_index[i]` of the batch (default: i). Returns per-caption
        `mask_iou` (thresholded), `mask_soft_iou` and the EMA's low-res mask logits."""
        if image_index is None:
            image_index = torch.arange(len(caption_ids))
        feats = self.model.encode_images(batch["images"])
        logits, *_ = self.model.segment(None, [Ids(c) for c in caption_ids], feats=feats, image_index=image_index)
        gt = batch["masks"][image_index].to(logits.device)
        return {
            "mask_iou": mask_iou(logits, gt).cpu(),
            "mask_soft_iou": soft_mask_iou(logits, gt).cpu(),
            "logits": logits.cpu(),
        }
