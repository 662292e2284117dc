"""SA-1B: one sample per mask annotation, mask-only (no text).

    <root>/sa_<n>.jpg + sa_<n>.json, or <root>/sa_000000/sa_<n>.{jpg,json}, ... (the extracted tar files)
    json: {"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation: {size: [h, w],
           counts: <COCO compressed RLE>}, area, bbox, predicted_iou, point_coords, crop_box,
           stability_score}]}

Shards are the extracted tar folders (about 11 k images, 1 M masks each) or, for a flat folder, runs of
`files_per_shard` JSON files. A shard's index holds two uint32 per kept mask (file ordinal, annotation
ordinal) and the shard's file stems: 8 bytes per mask, about 8 GB for all of SA-1B if every shard were
read, and only the shards a run reaches are. Masks under `min_area` pixels (by the JSON's `area`) are left
out of the index; RLE strings are validated (runs must add up to h*w) when a sample is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualrl.data.decode import BadSample, check_mask, read_image, rle_mask
from dualrl.data.sources.base import Shard, Source, skip

if TYPE_CHECKING:
    from dualrl.recipe import Sa1bSpec


FLAT = "flat:"  # shard name prefix for runs of files in the root folder


class Sa1bSource(Source):
    name = "sa1b"

    def __init__(self, spec: Sa1bSpec, size: int, split: str = "train", **kw):
        super().__init__(spec, size, **kw)
        self.root = Path(spec.root).expanduser()
        self._flat: list[str] | None = None

    def describe(self) -> str:
        return f"sa1b ({self.root})"

    def index_options(self) -> dict[str, Any]:
        return {"min_area": self.spec.min_area, "files_per_shard": self.spec.files_per_shard}

    def _flat_stems(self) -> list[str]:
        if self._flat is None:
            with os.scandir(self.root) as it:
                self._flat = sorted(e.name[:-5] for e in it if e.name.endswith(".json") and e.is_file())
        return self._flat

    def shards(self) -> list[str]:
        with os.scandir(self.root) as it:
            folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        n = len(self._flat_stems())
        per = self.spec.files_per_shard
        return folders + [f"{FLAT}{i}" for i in range((n + per - 1) // per)]

    def _stems(self, shard: str) -> tuple[Path, list[str]]:
        if shard.startswith(FLAT):
            i, per = int(shard[len(FLAT) :]), self.spec.files_per_shard
            return self.root, self._flat_stems()[i * per : (i + 1) * per]
        folder = self.root / shard
        with os.scandir(folder) as it:
            return folder, sorted(e.name[:-5] for e in it if e.name.endswith(".json"))

    def shard_stamp(self, shard: str) -> list:
        folder, stems = self._stems(shard)
        st = folder.stat()
        return [str(folder.resolve()), st.st_mtime_ns, len(stems), stems[:1], stems[-1:]]

    def build_shard(self, shard: str) -> Shard:
        folder, stems = self._stems(shard)
        rows: list[np.ndarray] = []
        kept: list[str] = []
        skipped: dict[str, int] = {}
        for stem in stems:
            try:
                with open(folder / f"{stem}.json", "rb") as f:
                    anns = json.load(f)["annotations"]
                areas = np.array([float(a.get("area", 0)) for a in anns], dtype=np.float64)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                skip(skipped, "annotation_corrupt", f"{folder / stem}.json: {err!r}", self.name)
                continue
            if not (folder / f"{stem}.jpg").exists():
                skip(skipped, "image_missing", f"{folder / stem}.jpg", self.name)
                continue
            keep = np.flatnonzero(areas >= max(1, self.spec.min_area))
            if len(keep) < len(areas):
                skip(
                    skipped,
                    "mask_too_small",
                    f"{folder / stem}.json: {len(areas) - len(keep)} masks under min_area={self.spec.min_area}",
                    self.name,
                    n=len(areas) - len(keep),
                )
            if len(keep):
                rows.append(np.stack([np.full(len(keep), len(kept), dtype=np.uint32), keep.astype(np.uint32)], 1))
                kept.append(stem)
        table = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.uint32)
        return Shard(table, names=kept, skipped=skipped)

    def key(self, index: Shard, shard: str, i: int) -> tuple:
        file, ann = index.rows[i]
        folder = self.root if shard.startswith(FLAT) else self.root / shard
        return str(folder / index.names[file]), int(ann)

    def load(self, key: tuple, seed: int) -> dict[str, Any]:
        stem, ann_index = key
        try:
            with open(f"{stem}.json", "rb") as f:
                record = json.load(f)
            info, ann = record["image"], record["annotations"][ann_index]
            h, w = int(info["height"]), int(info["width"])
            segmentation = ann["segmentation"]
        except FileNotFoundError:
            raise BadSample("annotation_corrupt", f"{stem}.json disappeared after indexing") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise BadSample("annotation_corrupt", f"{stem}.json annotation {ann_index}: {err!r}") from None
        mask = check_mask(rle_mask(segmentation, h, w, self.max_pixels), self.spec.min_area)
        image = read_image(f"{stem}.jpg", self.max_pixels, expect_hw=(h, w))
        return self.region(image, mask, index=f"{Path(stem).name}:{ann.get('id', ann_index)}")
