"""Held-out evaluation during training.

- `eval/ref_miou`: the student segments each region from its reference expression (RefCOCO-style).
- `eval/cycle_miou`: the student describes each region (greedy), the EMA segmenter segments that caption,
  IoU with the original mask — the dual loop's own measure of grounded captioning.
- `eval/reward_total`, `eval/reward/<name>`: the recipe's rewards of those captions.
- `eval/meteor`: METEOR of the student's captions against the regions' references (real WordNet); left
  out, with one warning, where WordNet is not installed.
IoU is computed at the mask's full resolution (logits upsampled), not at the low-res logit size, where
nearest-downsampled targets would cap it.
"""

from __future__ import annotations

import logging

import torch

from dualrl.algo.losses import mask_iou

log = logging.getLogger(__name__)


def evaluate(runtime, batches, table_rows: int = 0) -> tuple[dict[str, float], list[dict]]:
    ref_ious, cycle_ious, soft_ious, exact, lengths, examples = [], [], [], [], [], []
    texts, references, totals, rewards = [], [], [], {}
    for batch in batches:
        ref_iou, _ = runtime.learner.refer(batch)
        captions = runtime.learner.describe(batch)
        scored = runtime.reward.score(batch, captions)
        scores = scored.segmentation
        totals.append(scored.total)
        for key, values in scored.scores.items():
            rewards.setdefault(key, []).extend(v for v in values if v is not None)
        texts += captions.texts
        references += [list(r) for r in batch["references"]]
        ref_ious.append(ref_iou)
        cycle_ious.append(scores["mask_iou"])
        soft_ious.append(scores["mask_soft_iou"])
        exact += [c == e for c, e in zip(captions.texts, batch["expression"])]
        lengths += [len(i) for i in captions.ids]
        for i in range(min(table_rows - len(examples), len(captions.texts))):
            pred = _full_res(scores["logits"][i], batch["masks"].shape[-2:])
            examples.append(
                {
                    "image": batch["images"][i].numpy(),
                    "mask": batch["masks"][i].numpy(),
                    "pred": pred.numpy(),
                    "reference": batch["expression"][i],
                    "caption": captions.texts[i],
                    "cycle_iou": float(scores["mask_iou"][i]),
                    "ref_iou": float(ref_iou[i]),
                }
            )
    metrics = {
        "eval/ref_miou": torch.cat(ref_ious).mean().item(),
        "eval/cycle_miou": torch.cat(cycle_ious).mean().item(),
        "eval/cycle_soft_miou": torch.cat(soft_ious).mean().item(),
        "eval/caption_exact": sum(exact) / max(1, len(exact)),
        "eval/caption_tokens": sum(lengths) / max(1, len(lengths)),
        "eval/reward_total": torch.cat(totals).mean().item(),
        **{f"eval/reward/{k}": sum(v) / len(v) for k, v in rewards.items() if v},
    }
    metrics.update(_meteor(texts, references))
    return metrics, examples


def _meteor(texts: list[str], references: list[list[str]]) -> dict[str, float]:
    try:
        from rewards.meteor import meteor_scores

        scores = [s for s in meteor_scores(texts, references) if s is not None]
    except (ImportError, RuntimeError) as err:  # nltk or WordNet missing: the message says how to get it
        if not getattr(_meteor, "warned", False):
            log.warning("eval/meteor left out: %s", err)
            _meteor.warned = True
        return {}
    return {"eval/meteor": sum(scores) / len(scores)} if scores else {}


def _full_res(logits: torch.Tensor, size) -> torch.Tensor:
    up = torch.nn.functional.interpolate(logits[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return up[0, 0] > 0


__all__ = ["evaluate", "mask_iou"]
