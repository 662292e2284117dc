"""An example user reward: the share of a region's known attributes that its caption names.

Use it from a recipe without installing anything (a file path and the function's name; the other keys are
its options)::

    rewards:
      - {name: mask_iou, weight: 1.0}
      - {path: rewards/examples/attribute_recall.py, name: attribute_recall, weight: 0.2, keys: [colour, shape]}

It reads a dataset column (`batch.columns["attributes"]`, one dict per caption; the built-in `shapes` data
carries colour, shape, size and position), which is how a plugin sees anything the data has beyond images,
masks and references. A region without that column is not applicable: `None`, left out of its total.
"""

from __future__ import annotations

from collections.abc import Sequence


def attribute_recall(batch, keys: Sequence[str] = ("colour", "shape", "size", "position")) -> list[float | None]:
    attributes = batch.columns.get("attributes") or [None] * len(batch)
    out: list[float | None] = []
    for caption, attrs in zip(batch.captions, attributes):
        wanted = [str(attrs[k]).lower() for k in keys if attrs and attrs.get(k)]
        if not wanted:
            out.append(None)
            continue
        text = f" {caption.lower()} "
        out.append(sum(f" {w} " in text for w in wanted) / len(wanted))
    return out
