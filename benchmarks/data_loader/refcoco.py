"""RefCOCO in the `refer` layout: photo-sized COCO JPEGs, polygons of 30-80 vertices, a Python-2 refs(unc).p."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dualrl.data.fixtures import (
    py2_pickle,
    refer_sentence,
)
from dualrl.data.sources.refcoco import RefCocoSource
from dualrl.recipe import RefCocoSpec

from .common import MAX_PIXELS, Row, hw, picture


def polygon(rng: np.random.Generator, h: int, w: int, vertices: int, scale: float) -> list[float]:
    """A COCO polygon [x0, y0, x1, y1, ...]: a star-shaped outline with smooth radial noise (a few harmonics)
    and per-vertex jitter, `vertices` points, radius `scale` * min(h, w), clipped to the image."""
    r0 = scale * min(h, w)
    cy, cx = rng.uniform(r0, h - r0), rng.uniform(r0, w - r0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    k = np.arange(1, 6)[:, None]
    wobble = (rng.normal(0, 0.2, (5, 1)) / k * np.sin(k * angles + rng.uniform(0, 2 * np.pi, (5, 1)))).sum(0)
    r = r0 * np.clip(1 + wobble, 0.3, None) * rng.uniform(0.92, 1.08, vertices)
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    xs = np.clip(cx + r * np.cos(angles) * aspect, 0, w - 1)
    ys = np.clip(cy + r * np.sin(angles) / aspect, 0, h - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


WORDS = [
    w.encode()
    for w in (
        "man woman dog car chair left right red blue small big front back middle on the "
        "in with far near table person guy girl white black shirt sitting standing"
    ).split()
]


def write_refcoco(root: Path, refs: int, images: int, h: int, w: int, seed: int = 2) -> dict[str, Any]:
    """`images` COCO-named JPEGs (q90, photo-like), instances.json with one polygon object per ref (30-80
    vertices, a fifth in two parts), a Python-2-style refs(unc).p; returns (spec fields, sizes)."""
    folder, image_dir = root / "refcoco", root / "train2014"
    folder.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 3, (h + 64, w + 64)).round().astype(np.int16)
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    ids = sorted(int(v) for v in rng.choice(581_000, images, replace=False) + 9)
    jpg = 0
    for image_id in ids:
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(picture(rng, h, w, grain)).save(image_dir / name, quality=90)
        jpg += (image_dir / name).stat().st_size
        coco["images"].append({"id": image_id, "file_name": name, "height": h, "width": w, "license": 1})
    out, vertices, sent_id = [], 0, 0
    for ref_id in range(refs):
        image_id = ids[ref_id % images]
        n = int(rng.integers(30, 81))
        parts = [n] if rng.random() > 0.2 else [n - n // 3, n // 3]
        scale = float(rng.uniform(0.08, 0.3))
        segmentation = [polygon(rng, h, w, max(3, p), scale * (1 if i == 0 else 0.5)) for i, p in enumerate(parts)]
        vertices += sum(len(p) // 2 for p in segmentation)
        area = sum(
            0.5 * abs(float(np.dot(p[0::2], np.roll(p[1::2], 1)) - np.dot(p[1::2], np.roll(p[0::2], 1))))
            for p in segmentation
        )
        xs, ys = [v for p in segmentation for v in p[0::2]], [v for p in segmentation for v in p[1::2]]
        coco["annotations"].append(
            {
                "id": 1000 + ref_id,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": segmentation,
                "area": round(area, 2),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            }
        )
        sentences = []
        for _ in range(int(rng.integers(1, 4))):
            text = b" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(2, 9))))
            sentences.append(refer_sentence(sent_id, text if sent_id % 2 else text.decode()))
            sent_id += 1
        out.append(
            {
                b"sent_ids": [s[b"sent_id"] for s in sentences],
                b"ann_id": 1000 + ref_id,
                b"ref_id": ref_id,
                b"file_name": f"COCO_train2014_{image_id:012d}_{1000 + ref_id}.jpg".encode(),
                b"image_id": image_id,
                b"split": b"train",
                b"category_id": 1,
                b"sentences": sentences,
            }
        )
    (folder / "instances.json").write_text(json.dumps(coco))
    (folder / "refs(unc).p").write_bytes(py2_pickle(out))
    return {
        "spec": {"root": str(root), "images": str(image_dir)},
        "jpg_kb": jpg / images / 1e3,
        "vertices": vertices / refs,
        "pickle_kb": (folder / "refs(unc).p").stat().st_size / 1e3,
        "json_kb": (folder / "instances.json").stat().st_size / 1e3,
    }


def write_fixture(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The fixture of `--refs` refs over `--ref-images` images, timed; its "line" describes it."""
    t0 = time.perf_counter()
    (h, w), images = hw(args.ref_image_size), max(1, min(args.ref_images, args.refs))
    ref = write_refcoco(tmp / "refcoco", args.refs, images, h, w)
    ref["line"] = (
        f"   RefCOCO: {args.refs} refs over {images} images {h}x{w} (h x w), JPEG q90 {ref['jpg_kb']:.0f} KB; "
        f"polygons of {ref['vertices']:.0f} vertices mean (30-80, a fifth in 2 parts); refs(unc).p "
        f"{ref['pickle_kb']:.0f} KB (Python 2 pickle), instances.json {ref['json_kb']:.0f} KB; written in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return ref


def rows(fixture: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    def make() -> RefCocoSource:
        return RefCocoSource(RefCocoSpec(**fixture["spec"]), args.size, aspect="squash", max_pixels=MAX_PIXELS)

    return [Row("RefCOCO", "polygon + JPEG", make, args.source_samples, args.source_loads, False)]
