"""Batches of regions: what the workers and the learner receive.

images  uint8 [B, 3, S, S]    masks  bool [B, S, S]     the region to describe (and, by default, to segment)
expression, references, source, index, ...: one list entry per region (None where a source has no value)
seg_images, seg_masks: only when some region is a frame pair (SA-V): the frame to segment, t + k; a
    region without a pair repeats its own image and mask there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TENSORS = ("image", "mask", "seg_image", "seg_mask")


def collate_regions(items: list[dict[str, Any]], pin: bool = False) -> dict[str, Any]:
    """Stack images and masks; every other key becomes a list in item order (keys of all items, None where
    an item lacks one, so mixed sources batch together). `pin`: images and masks are stacked into pinned host memory,
    from which a GPU learner copies them without staging them there itself (one copy of the batch fewer a step)."""
    if not items:
        raise ValueError("collate_regions needs at least one item")
    keys = list(dict.fromkeys(k for item in items for k in item if k not in TENSORS))
    batch: dict[str, Any] = {key: [item.get(key) for item in items] for key in keys}
    batch["references"] = [r or [] for r in batch.get("references", [None] * len(items))]
    batch["images"] = _stack([item["image"] for item in items], pin)
    batch["masks"] = _stack([item["mask"] for item in items], pin)
    if any("seg_image" in item for item in items):
        batch["seg_images"] = _stack([item.get("seg_image", item["image"]) for item in items], pin)
        batch["seg_masks"] = _stack([item.get("seg_mask", item["mask"]) for item in items], pin)
    return batch


def _stack(tensors: list[torch.Tensor | np.ndarray], pin: bool = False) -> torch.Tensor:
    """Stack CPU tensors (or the numpy arrays loader workers send) with numpy: a plain copy that stays off torch's
    intra-op thread pool, whose threads would otherwise compete with the loader workers for the cores (measured:
    16-core host, 12 workers, 56 samples/s with torch's pool at 16 threads in the training process against 116
    at 1 thread)."""
    if isinstance(tensors[0], torch.Tensor) and tensors[0].device.type != "cpu":
        return torch.stack(tensors)
    arrays = [t.numpy() if isinstance(t, torch.Tensor) else t for t in tensors]
    if not pin:
        return torch.from_numpy(np.stack(arrays))
    dtype = torch.from_numpy(np.empty(0, np.result_type(*arrays))).dtype  # np.stack's own promotion
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=dtype, pin_memory=True)
    np.stack(arrays, out=out.numpy())
    return out
