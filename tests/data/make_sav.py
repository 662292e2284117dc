"""Tiny SA-V fixtures in the published layout: sav_<id>.mp4 (24 fps) beside sav_<id>_manual.json /
sav_<id>_auto.json, and the derived .npz frame pairs.

Every video frame is one solid grey whose level encodes its frame number (`grey`: 4 levels apart, read
back by `frame_of`; H.264 at crf 10 moves a flat frame's mean by about one level).

The manual JSON of `write_video_sample` holds three objects, annotated every 4th frame (annotation k =
frame 4k):

    obj0: a 16x20 box moving right by one pixel per annotation, visible in every annotation
    obj1: a 12x10 box, visible in annotations 0..4 and 8..9, an all-zero RLE in 5..7 (out of view)
    obj2: a 2x2 box in every annotation (under any min_area >= 5)
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from dualrl.data.fixtures import VIDEO_CODEC, VIDEO_FPS, coco_rle, write_sav_json

H, W, FRAMES = 48, 64, 40
ANNOTATED = FRAMES // 4  # annotations 0..9 = frames 0, 4, ..., 36
HIDDEN = (5, 6, 7)  # annotations where obj1 is out of view


def grey(frame: int) -> int:
    return 8 + 4 * frame  # frames 0..61 fit in 8 bits


def frame_of(image) -> int:
    """The frame number a decoded image (uint8 [3, S, S] tensor or [H, W, 3] array) shows."""
    level = float(np.asarray(image, dtype=np.float64).mean())
    return round((level - 8) / 4)


def write_mp4(path: Path, frames: int = FRAMES, height: int = H, width: int = W, gop: int = 12) -> Path:
    """A 24 fps video whose frame i is the solid grey `grey(i)`; a keyframe every `gop` frames, so reading a
    late frame needs a seek and decoding forward."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(VIDEO_CODEC, rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if VIDEO_CODEC == "libx264":
            stream.options = {"crf": "10", "keyint_min": str(gop)}
        else:
            stream.bit_rate = 2_000_000
        for i in range(frames):
            image = np.full((height, width, 3), grey(i), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def box(y0: int, x0: int, h: int, w: int, height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    return mask


def object_mask(obj: int, k: int, height: int = H, width: int = W) -> np.ndarray:
    """The mask of object `obj` in annotation k of `write_video_sample`'s manual JSON."""
    if obj == 0:
        return box(4, 2 + k, 16, 20, height, width)
    if obj == 1:
        return box(30, 40, 12, 10, height, width) if k not in HIDDEN else np.zeros((height, width), dtype=bool)
    return box(44, 60, 2, 2, height, width)


def masklet(objects: int = 3, annotated: int = ANNOTATED, height: int = H, width: int = W) -> list[list[dict]]:
    return [[coco_rle(object_mask(j, k, height, width)) for j in range(objects)] for k in range(annotated)]


def write_json(
    path: Path,
    video_id: str,
    masks: list[list[dict]],
    kind: str = "manual",
    frames: int = FRAMES,
    height: int = H,
    width: int = W,
) -> Path:
    """An SA-V annotation file for this fixture's videos (FRAMES frames of H x W unless told otherwise)."""
    return write_sav_json(path, video_id, masks, kind, frames, height, width)


def write_video_sample(folder: Path, video_id: str, auto: bool = False, **mp4) -> Path:
    """sav_<id>.mp4 + sav_<id>_manual.json (three objects, see above), and with `auto` an _auto.json holding
    obj0's masklet only. Returns the mp4 path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_mp4(folder / f"{video_id}.mp4", **mp4)
    write_json(folder / f"{video_id}_manual.json", video_id, masklet())
    if auto:
        write_json(folder / f"{video_id}_auto.json", video_id, masklet(objects=1), kind="auto")
    return path


def write_npz(
    path: Path, frame1: int = 3, frame2: int = 7, mask_hw: tuple[int, int] = (H, W), drop: str | None = None
) -> Path:
    """A pre-extracted frame pair: frames grey(frame1), grey(frame2); masks obj0's boxes (mask2 as uint8).
    `mask_hw` other than (H, W) makes mismatched masks; `drop` leaves out one array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "frame1": np.full((H, W, 3), grey(frame1), dtype=np.uint8),
        "mask1": object_mask(0, 0, *mask_hw),
        "frame2": np.full((H, W, 3), grey(frame2), dtype=np.uint8),
        "mask2": object_mask(0, 5, *mask_hw).astype(np.uint8),
    }
    arrays.pop(drop, None)
    np.savez(path, **arrays)
    return path
