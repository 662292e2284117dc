"""RewardWorker: owns the EMA segmenter and the reward plugins.

`segment`: for each caption, EMA `segment(image, caption)` -> mask' -> IoU(mask', original mask); each image
is encoded once for all the captions of its regions (G captions of a region cost one encoding).
`score`: that, then every reward plugin of the recipe on the captions (`rewards.registry.RewardSet`): the
weighted total per caption, each plugin's scores and the `reward/*` metrics. The cycle IoU is reported by
every algorithm (`sft_dual` learns from its differentiable loss and logs it as a diagnostic).
"""

from __future__ import annotations

import torch

from dualrl.algo.losses import mask_iou, soft_mask_iou
from dualrl.model.build import build_model
from dualrl.model.grounded_vlm import Captions, GroundedVLM
from dualrl.model.sequence import Ids
from dualrl.model.transfer import upload
from dualrl.recipe import ModelSpec, RewardSpec
from rewards.base import RewardInput
from rewards.registry import RewardResult, RewardSet

_NOT_COLUMNS = ("images", "masks", "references")


class RewardWorker:
    def __init__(self, model_spec: ModelSpec, rewards: list[RewardSpec], device: str, model: GroundedVLM | None = None):
        self.model = model if model is not None else build_model(model_spec, device)
        self.model.eval()
        self.rewards = RewardSet(rewards)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable(state)

    @torch.no_grad()
    def segment(self, batch: dict, caption_ids: list[torch.Tensor], region: torch.Tensor | None = None) -> dict:
        """`caption_ids[i]` describes region `region[i]` of the batch (default: i). Returns per-caption
        `mask_iou` (thresholded), `mask_soft_iou` and the EMA's low-res mask logits."""
        if region is None:
            region = torch.arange(len(caption_ids))
        # The frames to segment: the described ones, or the later frame of a frame pair (SA-V).
        images, masks = batch.get("seg_images", batch["images"]), batch.get("seg_masks", batch["masks"])
        with self.model.autocast():
            feats = self.model.encode_images(images)
            logits, *_ = self.model.segment(None, [Ids(c) for c in caption_ids], feats=feats, image_index=region)
        logits = logits.float()
        gt = upload(masks[region], logits.device)
        return {
            "mask_iou": mask_iou(logits, gt).cpu(),
            "mask_soft_iou": soft_mask_iou(logits, gt).cpu(),
            "logits": logits.cpu(),
        }

    def score(
        self, batch: dict, captions: Captions, group_size: int = 1, segmentation: dict | None = None
    ) -> RewardResult:
        """Every reward plugin on the captions; `group_size` consecutive captions per region. `segmentation`: what
        `segment` returned for these captions, when other reward workers segmented them (split among several)."""
        region = torch.arange(len(batch["masks"])).repeat_interleave(group_size)
        seg = segmentation if segmentation is not None else self.segment(batch, captions.ids, region)
        rows = region.tolist()
        columns = {
            k: [v[r] for r in rows]
            for k, v in batch.items()
            if k not in _NOT_COLUMNS and isinstance(v, list) and len(v) == len(batch["masks"])
        }
        references = batch.get("references") or [[] for _ in batch["masks"]]
        inputs = RewardInput(
            captions=captions.texts,
            caption_ids=captions.ids,
            region=region,
            images=batch["images"],
            masks=batch["masks"],
            references=[list(references[r]) for r in rows],
            group_size=group_size,
            columns=columns,
            segmentation={"mask_iou": seg["mask_iou"], "mask_soft_iou": seg["mask_soft_iou"]},
        )
        result = self.rewards(inputs)
        result.metrics["train/cycle_iou"] = seg["mask_iou"].mean().item()
        result.segmentation = seg
        return result

    def close(self) -> None:
        self.rewards.close()
