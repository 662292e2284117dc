"""Writers of the published file formats, for synthetic data in the layouts the sources read.

The tests' tiny format-exact fixtures (tests/data/make_*.py) and the data-loader benchmark's photo-sized
ones (benchmarks/data_loader/) write through these functions, so each format is stated once:

- RefCOCO (`refer` layout): `py2_pickle` writes refs(unc).p as Python 2 did; `refer_sentence` is one of a ref's
  sentences;
- SA-1B: `coco_rle` (also SA-V's mask format) and `write_sa1b_record`, one sa_<n>.jpg + sa_<n>.json;
- SA-V: `write_sav_json`, an annotation file with the release's fields; `VIDEO_CODEC`, the codec to write the
  videos with;
- OpenImages v7: `OPENIMAGES_HEADER`, the segmentation annotation CSV's header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

OPENIMAGES_HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
VIDEO_FPS = 24  # SA-V's frame rate
VIDEO_CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"  # SA-V's is H.264 where PyAV has it


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """bool [h, w] -> {"size": [h, w], "counts": str}, the compressed COCO RLE that SA-1B and SA-V store."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def py2_pickle(obj: Any) -> bytes:
    """Pickle as Python 2's cPickle (protocol 2) did: `bytes` become py2 `str` (SHORT_BINSTRING / BINSTRING),
    `str` py2 `unicode` (BINUNICODE). The refer pickles hold both. None, bool, int (32-bit), float, bytes, str,
    list and dict only."""
    out = bytearray(b"\x80\x02")

    def put(x: Any) -> None:
        if x is None:
            out.extend(b"N")
        elif isinstance(x, bool):
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, bytes):
            out.extend((b"U" + bytes([len(x)])) if len(x) < 256 else (b"T" + struct.pack("<I", len(x))))
            out.extend(x)
        elif isinstance(x, str):
            data = x.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(x, list):
            out.extend(b"](")
            for v in x:
                put(v)
            out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}(")
            for k, v in x.items():
                put(k)
                put(v)
            out.extend(b"u")
        else:
            raise TypeError(f"py2_pickle cannot write {type(x).__name__}")

    put(obj)
    out.extend(b".")
    return bytes(out)


def refer_sentence(sent_id: int, text: Any) -> dict[bytes, Any]:
    """One entry of a ref's `sentences` as the refer pickles hold it (bytes keys); `text` may be bytes or str,
    or anything else for a broken sentence (then empty raw text and no tokens)."""
    raw = text if isinstance(text, (str, bytes)) else ""
    return {b"tokens": raw.split(), b"raw": raw, b"sent_id": sent_id, b"sent": raw}


def write_sa1b_record(folder: Path, image_id: int, image: np.ndarray, anns: list[dict], quality: int = 95) -> Path:
    """sa_<image_id>.jpg (JPEG at `quality`) and sa_<image_id>.json holding `anns`; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = image.shape[:2]
    Image.fromarray(image).save(folder / f"sa_{image_id}.jpg", quality=quality)
    record = {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": anns,
    }
    path = folder / f"sa_{image_id}.json"
    path.write_text(json.dumps(record))
    return path


def write_sav_json(
    path: Path, video_id: str, masks: list[list[dict]], kind: str, frames: int, height: int, width: int
) -> Path:
    """An SA-V annotation file (`kind` "manual" or "auto") with the published fields, video numbers as floats
    like the release; `masks[k][j]` is object j's RLE in annotation k (frame 4k)."""
    objects = len(masks[0]) if masks else 0
    doc = {
        "video_id": video_id,
        "video_duration": frames / VIDEO_FPS,
        "video_frame_count": float(frames),
        "video_height": float(height),
        "video_width": float(width),
        "video_resolution": float(height * width),
        "video_environment": "Indoor",
        "video_split": "train",
        "masklet": masks,
        "masklet_id": list(range(objects)),
        "masklet_size_rel": [0.1] * objects,
        "masklet_size_abs": [300.0] * objects,
        "masklet_size_bucket": ["medium"] * objects,
        "masklet_visibility_changes": [0] * objects,
        "masklet_first_appeared_frame": [0.0] * objects,
        "masklet_frame_count": [float(len(masks))] * objects,
        "masklet_edited_frame_count": [0.0] * objects,
        "masklet_type": [kind] * objects,
        "masklet_num": objects,
    }
    if kind == "auto":
        doc["masklet_stability_score"] = [[0.95] * len(masks)] * objects
    path.write_text(json.dumps(doc))
    return path
