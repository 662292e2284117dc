"""The command line's measures of one model on held-out regions (names: docs/eval.md).

- referring segmentation, RefCOCO protocol: every sentence of every region is one query; `ref_miou` = mean of
  the per-query IoUs (the papers' gIoU), `ref_ciou` = total intersection / total union;
- `meteor`: the model's greedy caption of each region against all its sentences (nltk, WordNet);
- `cycle_miou`: the model segments its own caption of each region; mean IoU with the region's mask.
Samples that carry a `full_mask` are scored at their file's resolution, the others on the working square.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from dualrl.data.batch import collate_regions
from dualrl.eval.metrics import (
    MeteorUnavailable,
    binarize,
    cumulative_iou,
    intersection_union,
    mean_iou,
    mean_meteor,
    to_file_resolution,
)

EXAMPLES = 5  # captions with their references kept in the result, for a look


class EmptySplit(ValueError):
    """No usable region to evaluate."""


@torch.no_grad()
def evaluate_model(model, samples: Iterable[dict], batch_size: int, aspect: str = "squash") -> dict:
    """`ref_miou`, `ref_ciou`, `meteor`, `cycle_miou` and counts over `samples`, `batch_size` regions at a time.
    `aspect` says how the working square was made (`data.aspect`), for scoring at the file's resolution."""
    ref: list[tuple[Tensor, Tensor]] = []
    cycle: list[tuple[Tensor, Tensor]] = []
    captions: list[str] = []
    references: list[list[str]] = []
    lengths: list[int] = []
    with model.autocast():
        for batch in map(collate_regions, _chunks(samples, batch_size)):
            feats = model.encode_images(batch["images"])
            queries = [(r, s) for r, group in enumerate(_sentences(batch)) for s in group if s]
            if queries:
                index = torch.tensor([r for r, _ in queries])
                logits, *_ = model.segment(None, [s for _, s in queries], feats=feats, image_index=index)
                ref.append(_intersection_union(logits, batch, index.tolist(), aspect))
            described = model.describe(None, batch["masks"], feats=feats)
            logits, *_ = model.segment(None, described.texts, feats=feats)
            cycle.append(_intersection_union(logits, batch, list(range(len(described.texts))), aspect))
            captions += described.texts
            lengths += [len(ids) for ids in described.ids]
            references += [list(r) for r in batch["references"]]
    if not captions:
        raise EmptySplit("no usable region in the split")
    out: dict = {"regions": len(captions)}
    if ref:
        inter, union = (torch.cat(t) for t in zip(*ref))
        out.update(queries=len(inter), ref_miou=mean_iou(inter, union), ref_ciou=cumulative_iou(inter, union))
    out["cycle_miou"] = mean_iou(*(torch.cat(t) for t in zip(*cycle)))
    try:
        meteor = mean_meteor(captions, references)
    except MeteorUnavailable as err:  # reported in the result, the other measures stand
        out["meteor_error"] = str(err)
    else:
        if meteor is not None:
            out["meteor"] = meteor
    out["caption_tokens"] = sum(lengths) / len(lengths)
    out["examples"] = [{"caption": c, "references": r} for c, r in list(zip(captions, references))[:EXAMPLES]]
    return out


def _chunks(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _sentences(batch: dict) -> list[list[str]]:
    """Each region's referring sentences: its references, or its expression when it has none."""
    return [list(refs) or [batch["expression"][r]] for r, refs in enumerate(batch["references"])]


def _intersection_union(logits: Tensor, batch: dict, rows: list[int], aspect: str) -> tuple[Tensor, Tensor]:
    """Intersection and union (on the CPU) of each query's mask with the mask of its region `rows[q]`: at the
    file's resolution when every sample of the batch carries one (`full_mask`), else on the working square."""
    full = batch.get("full_mask")
    if not full or any(m is None for m in full):
        inter, union = intersection_union(binarize(logits, batch["masks"].shape[-2:]), batch["masks"][rows])
        return inter.cpu(), union.cpu()
    square = batch["masks"].shape[-1]
    counts = [
        intersection_union(to_file_resolution(lg, full[r].shape, aspect, square)[None], torch.from_numpy(full[r])[None])
        for lg, r in zip(logits, rows)
    ]
    return torch.cat([i for i, _ in counts]).cpu(), torch.cat([u for _, u in counts]).cpu()
