"""Decoding the files of real datasets into numpy arrays, with every way they can be broken named.

A broken input raises `BadSample(reason, detail)`; the loader skips it, counts it under `data/skipped/<reason>`
and logs the first one of each reason. The reasons are a small fixed vocabulary (`REASONS`) so that the
metrics stay comparable across runs and sources.

Images are read in their stored pixel order: EXIF orientation is *not* applied, because COCO, SA-1B and
OpenImages annotations are drawn on the stored pixels (a reader that rotates swaps height and width relative
to the masks). Every image becomes 8-bit RGB: grayscale is repeated, alpha dropped, palette expanded, CMYK
converted, and 16-bit samples scaled down to 8 bits rather than clipped.
"""

from __future__ import annotations

import io
import os
import unicodedata
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

REASONS = (
    "annotation_corrupt",  # an annotation file (JSON, CSV row, pickle) cannot be parsed or misses fields
    "bad_polygon",  # no polygon with >= 3 finite points
    "bad_rle",  # RLE counts that do not decode to exactly h*w pixels, or of an unknown form
    "bad_sentence",  # one sentence dropped from a referring object that keeps others (counts sentences)
    "bad_text",  # every sentence of a referring object is empty or not UTF-8
    "empty_mask",  # no foreground pixel (or none left after resizing)
    "full_mask",  # every pixel is foreground: no region to describe
    "image_corrupt",  # unreadable, truncated or not an image
    "image_missing",
    "image_too_large",
    "load_error",  # anything else a loader raised (logged with its traceback once)
    "mask_aspect_mismatch",  # a mask stored at a resolution of its own has another aspect ratio than its image
    "mask_missing",
    "mask_size_mismatch",  # mask and image disagree on (h, w) where the format says they must agree
    "mask_too_small",  # under the source's minimum area
    "masklet_mismatch",  # a video masklet's annotated frames or objects per frame disagree with its video
    "video_corrupt",
    "video_frame_rate",  # a video not at the frame rate its annotations assume (SA-V: 24 fps)
    "video_missing",
)


class BadSample(Exception):
    """One sample that cannot be used. `reason` is one of `REASONS`; `detail` says which file and why."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------- images
def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255
        gray = np.clip(wide * 255 // top, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float32))
        hi = float(gray.max(initial=0.0)) or 1.0
        return np.repeat((np.clip(gray / hi, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGBA" if "transparency" in img.info else img.mode).convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_image(
    source: str | os.PathLike | bytes, max_pixels: int, expect_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """An image file (path or bytes) -> uint8 [H, W, 3] in stored pixel order.

    `max_pixels` is checked from the header, before any pixel is decoded. `expect_hw`, when the annotation
    gives the size, must match the stored size.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise BadSample("image_missing", f"{name} does not exist") from None
    except OSError as err:
        raise BadSample("image_corrupt", f"{name}: {err}") from None
    with handle:
        try:
            with Image.open(handle) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise BadSample("image_too_large", f"{name} is {w}x{h}, over data.max_image_pixels={max_pixels}")
                if expect_hw is not None and (h, w) != tuple(expect_hw):
                    raise BadSample(
                        "mask_size_mismatch",
                        f"{name} is {h}x{w} (h x w), the annotation says {expect_hw[0]}x{expect_hw[1]}",
                    )
                img.load()
                return _to_rgb8(img)
        except BadSample:
            raise
        except Image.DecompressionBombError as err:  # PIL's own limit, hit when opening the header
            raise BadSample("image_too_large", f"{name}: {err}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise BadSample("image_corrupt", f"{name}: {err}") from None


def read_mask_png(source: str | os.PathLike | bytes) -> np.ndarray:
    """A binary mask PNG (any bit depth or palette) -> bool [H, W]: nonzero is foreground."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            arr = np.asarray(img)
    except FileNotFoundError:
        raise BadSample("mask_missing", f"{name} does not exist") from None
    except Image.DecompressionBombError as err:
        raise BadSample("image_too_large", f"mask {name}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSample("mask_missing", f"{name} is not a readable PNG: {err}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] in (3, 4) else arr[..., 0]
    return arr > 0


# -------------------------------------------------------------------------------------------- masks
def rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a COCO compressed RLE string (the inverse of pycocotools' `rleToString`).

    Each run is a little-endian base-32 number in characters 48..111 (5 bits each, bit 0x20 = more follows,
    bit 0x10 of the last one = negative); from the third run on, the value is a difference to the run two
    places earlier. pycocotools decodes malformed strings without complaint, so callers check the result."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    value = shift = 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {ch!r} is outside the RLE alphabet")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("the string ends inside a run")
    return runs


def rle_mask(rle: Any, height: int | None = None, width: int | None = None, max_pixels: int = 1 << 28) -> np.ndarray:
    """A COCO RLE (compressed string or uncompressed list counts) -> bool [h, w]. Raises `BadSample`
    ("bad_rle") unless the runs are non-negative and add up to exactly h*w; ("mask_size_mismatch") when
    `height`/`width` are given and differ from the RLE's own size; ("image_too_large") over `max_pixels`,
    before anything is allocated."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            runs = [int(c) for c in counts]
        elif isinstance(counts, (str, bytes)):
            runs = rle_counts(counts)
        else:
            raise ValueError(f"counts of type {type(counts).__name__}")
    except (KeyError, TypeError, ValueError) as err:
        raise BadSample("bad_rle", f"malformed RLE: {err}") from None
    if h * w > max_pixels:
        raise BadSample("image_too_large", f"RLE of {h}x{w} pixels, over {max_pixels}")
    if h <= 0 or w <= 0 or any(r < 0 for r in runs) or sum(runs) != h * w:
        raise BadSample(
            "bad_rle", f"RLE runs sum to {sum(runs)} with min {min(runs, default=0)}, size {h}x{w} needs {h * w}"
        )
    if height is not None and (h, w) != (height, width):
        raise BadSample("mask_size_mismatch", f"RLE size {h}x{w}, image {height}x{width}")
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    else:
        encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).view(bool)  # 0/1 bytes: a bool view, no copy


def polygon_mask(polygons: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons [[x1, y1, x2, y2, ...], ...] -> bool [h, w]. Parts with fewer than three points or
    non-finite numbers are dropped (a 4-number part would be read as a box by pycocotools); none left
    raises `BadSample("bad_polygon")`."""
    parts = []
    if isinstance(polygons, list):
        for part in polygons:
            try:
                xy = np.asarray(part, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            reach = 4 * max(height, width)  # COCO polygons overshoot the border by a few pixels, not by this
            if (
                xy.ndim == 1
                and len(xy) >= 6
                and len(xy) % 2 == 0
                and np.isfinite(xy).all()
                and np.abs(xy).max() <= reach
            ):  # pycocotools overflows (and crashes) on huge coordinates
                parts.append(xy.tolist())
    if not parts:
        raise BadSample("bad_polygon", f"no polygon with >= 3 finite points near the image in {str(polygons)[:80]}")
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))).astype(bool)


def coco_segmentation(segmentation: Any, height: int, width: int, max_pixels: int = 1 << 28) -> np.ndarray:
    """A COCO `segmentation` field in any of its three forms (polygons, uncompressed or compressed RLE)."""
    if height * width > max_pixels:
        raise BadSample("image_too_large", f"annotation of {height}x{width} pixels, over {max_pixels}")
    if isinstance(segmentation, dict):
        return rle_mask(segmentation, height, width, max_pixels)
    return polygon_mask(segmentation, height, width)


def check_mask(mask: np.ndarray, min_area: int = 1) -> np.ndarray:
    """Reject masks with no region to describe: empty, every pixel, or under `min_area` pixels."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        raise BadSample("empty_mask", "the mask has no foreground pixel")
    if area == mask.size:
        raise BadSample("full_mask", f"the mask covers all {mask.size} pixels")
    if area < min_area:
        raise BadSample("mask_too_small", f"area {area} < min_area {min_area}")
    return mask


# --------------------------------------------------------------------------------------------- text
def clean_text(value: Any) -> str | None:
    """A sentence from an annotation file -> normalised text, or None when it is unusable (bytes that are
    not UTF-8, text with a lone surrogate, control characters only, empty).

    Python 2's `unicode` arrives through pickle with its surrogates passed through: a pair is joined into
    the character it encodes, a lone one makes the text invalid (it is not a character, and no tokenizer
    can encode it)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    try:
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    text = unicodedata.normalize("NFC", value)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = " ".join(text.split())
    return text or None
