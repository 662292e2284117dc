"""Format-exact RefCOCO fixtures: instances.json, a Python-2-style refs(unc).p, COCO train2014 JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dualrl.data.fixtures import py2_pickle, refer_sentence


def make_refcoco(root: Path, h: int = 48, w: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Two COCO images with three objects (a polygon, a multi-part polygon, an RLE crowd region) and refs
    in the train and val splits. Returns (refer root, image folder)."""
    folder, images = root / "refcoco", root / "train2014"
    folder.mkdir(parents=True)
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing", "supercategory": "x"}]}
    for image_id in (9, 581857):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(pixels).save(images / name, quality=95)
        coco["images"].append({"id": image_id, "file_name": name, "height": h, "width": w, "license": 1})
    square = [[4.0, 4.0, 24.0, 4.0, 24.0, 24.0, 4.0, 24.0]]
    two_parts = [[30.0, 2.0, 40.0, 2.0, 40.0, 12.0, 30.0, 12.0], [44.0, 2.0, 54.0, 2.0, 54.0, 12.0]]
    crowd = {"size": [h, w], "counts": [h * 10 + 5, 10, h * w - h * 10 - 15]}  # uncompressed RLE
    for ann_id, image_id, seg in ((1, 9, square), (2, 9, two_parts), (3, 581857, crowd)):
        coco["annotations"].append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": seg,
                "area": 100.0,
                "bbox": [0, 0, 1, 1],
                "iscrowd": int(isinstance(seg, dict)),
            }
        )
    refs = [
        {
            b"sent_ids": [0, 1],
            b"file_name": b"COCO_train2014_000000000009_1.jpg",
            b"ann_id": 1,
            b"ref_id": 0,
            b"image_id": 9,
            b"split": b"train",
            b"category_id": 1,
            b"sentences": [refer_sentence(0, b"left square"), refer_sentence(1, "the box on the left")],
        },
        {
            b"sent_ids": [2],
            b"file_name": b"x.jpg",
            b"ann_id": 2,
            b"ref_id": 1,
            b"image_id": 9,
            b"split": b"train",
            b"category_id": 1,
            b"sentences": [refer_sentence(2, "two small boxes")],
        },
        {
            b"sent_ids": [3],
            b"file_name": b"y.jpg",
            b"ann_id": 3,
            b"ref_id": 2,
            b"image_id": 581857,
            b"split": b"val",
            b"category_id": 1,
            b"sentences": [refer_sentence(3, "the crowd stripe")],
        },
    ]
    (folder / "instances.json").write_text(json.dumps(coco))
    (folder / "refs(unc).p").write_bytes(py2_pickle(refs))
    return root, images
