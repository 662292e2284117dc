"""Format-exact SA-1B fixtures: sa_<n>.jpg + sa_<n>.json with COCO compressed RLE masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualrl.data.fixtures import coco_rle, write_sa1b_record


def boxes_image(h: int, w: int, boxes: list[tuple[int, int, int, int]], seed: int = 0):
    """A noisy image with a coloured rectangle per box (y0, x0, y1, x1), and the boxes' masks."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    masks = []
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        image[y0:y1, x0:x1] = ((60 * i + 40) % 255, (90 * i + 200) % 255, (150 * i) % 255)
        m = np.zeros((h, w), dtype=bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    return image, masks


def annotation(ann_id: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    return {
        "id": ann_id,
        "segmentation": coco_rle(mask),
        "area": int(mask.sum()),
        "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
        "predicted_iou": 0.9,
        "point_coords": [[float(xs.mean()), float(ys.mean())]],
        "crop_box": [0, 0, int(mask.shape[1]), int(mask.shape[0])],
        "stability_score": 0.95,
    }


def make_sa1b(root: Path, images: int = 3, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    """`images` pictures with 3 box masks each (areas 16*16, 12*20, 4*4 px) under root."""
    for n in range(images):
        image, masks = boxes_image(h, w, [(2, 2, 18, 18), (20, 30, 32, 50), (40, 56, 44, 60)], seed + n)
        write_sa1b_record(root, 100 + n, image, [annotation(1000 * n + i, m) for i, m in enumerate(masks)])
    return root
