"""Held-out evaluation during training: the `eval/*` metrics of metrics.jsonl (names: docs/eval.md).

- `eval/ref_miou`: the student segments each region from its reference expression (RefCOCO-style).
- `eval/cycle_miou`: the student describes each region (greedy), the EMA segmenter segments that caption,
  IoU with the original mask — the dual loop's own measure of grounded captioning. `eval/cycle_soft_miou`: the
  same with the soft (probabilistic) IoU.
- `eval/caption_exact`, `eval/caption_tokens`: captions equal to the region's expression; mean caption length.
- `eval/reward_total`, `eval/reward/<name>`: the recipe's rewards of those captions.
- `eval/meteor`: METEOR of the student's captions against the regions' references (real WordNet); left
  out, with one warning, where WordNet is not installed.
IoU is computed at the mask's full resolution (logits upsampled), not at the low-res logit size, where
nearest-downsampled targets would cap it.
"""

from __future__ import annotations

import logging

import torch

from dualrl.eval.metrics import MeteorUnavailable, binarize, mean_meteor

log = logging.getLogger(__name__)

PREFIX = "eval/"
_meteor_warned = False


def evaluate(runtime, batches, table_rows: int = 0) -> tuple[dict[str, float], list[dict]]:
    """The `eval/*` metrics of the runtime's learner (student) and reward worker (EMA segmenter) over `batches`,
    and up to `table_rows` examples (image, mask, cycle mask, reference, caption, IoUs) for the run's table."""
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
            examples.append(
                {
                    "image": batch["images"][i].numpy(),
                    "mask": batch["masks"][i].numpy(),
                    "pred": binarize(scores["logits"][i : i + 1], batch["masks"].shape[-2:])[0].numpy(),
                    "reference": batch["expression"][i],
                    "caption": captions.texts[i],
                    "cycle_iou": float(scores["mask_iou"][i]),
                    "ref_iou": float(ref_iou[i]),
                }
            )
    metrics = {
        "ref_miou": torch.cat(ref_ious).mean().item(),
        "cycle_miou": torch.cat(cycle_ious).mean().item(),
        "cycle_soft_miou": torch.cat(soft_ious).mean().item(),
        "caption_exact": sum(exact) / max(1, len(exact)),
        "caption_tokens": sum(lengths) / max(1, len(lengths)),
        "reward_total": torch.cat(totals).mean().item(),
        **{f"reward/{k}": sum(v) / len(v) for k, v in rewards.items() if v},
    }
    meteor = _meteor_once(texts, references)
    if meteor is not None:
        metrics["meteor"] = meteor
    return {PREFIX + k: v for k, v in metrics.items()}, examples


def _meteor_once(texts: list[str], references: list[list[str]]) -> float | None:
    """METEOR, or None with one warning per run when nltk or WordNet is missing (a run's metrics go on)."""
    global _meteor_warned
    try:
        return mean_meteor(texts, references)
    except MeteorUnavailable as err:
        if not _meteor_warned:
            log.warning("eval/meteor left out: %s", err)
            _meteor_warned = True
        return None
