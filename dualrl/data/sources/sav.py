"""SA-V (Segment Anything Video) in its published layout, or as pre-extracted .npz frame pairs.

Layout: `sav_train/sav_000/sav_000123.mp4` (24 fps, H.264) beside `sav_000123_manual.json` and/or
`sav_000123_auto.json`. The JSON's `masklet` is a list over annotated frames (annotation k = video frame
4k, 6 fps: ceil(frames / 4) of them) of a list over objects of one compressed COCO RLE each, the same
objects in every annotated frame; an object out of view is an all-zero RLE, not absent. `video_height` and
`video_width` (floats) give the video's size; the other fields (`masklet_id`, ...) are not needed here.
The derived form: `.npz` files with `frame1, mask1, frame2, mask2` (uint8 HxWx3 frames, HxW masks).

Shards are the sub-folders of `root` holding such files (`sav_000`, ...), plus "." when root holds them
itself. A folder with .npz files and no SA-V JSON is an npz shard: one sample per file, always a pair
(describe frame1's region, segment frame2's). A video shard has one row per (video, JSON kind, object,
annotation k) whose mask is visible with `min_area` pixels (pycocotools' area of the RLE, no decoding);
the row is `pair_ok` when the object is also visible at k + `pair_gap`. Indexing checks RLE structure and
alphabet, and the run lengths of masks of area 0 (a malformed RLE can have no foreground and must not pass
for an object out of view); the runs of visible masks are checked when a sample is loaded (`rle_mask`).

Indexing also reads each video's header and checks the annotations against it, skipping what disagrees
(counted by reason, the first of each logged): a video that cannot be opened (`video_corrupt`), one not at
24 fps (`video_frame_rate`: annotation k would not be frame 4k), a masklet with another number of annotated
frames than ceil(frames / 4) or with objects per frame that differ (`masklet_mismatch`), a JSON whose
`video_height` x `video_width` is not the video's size (`mask_size_mismatch`).

Loading a row re-reads its JSON, draws with probability `pairs` whether to make a pair (pair_ok rows
only), and decodes the frame(s) with PyAV: a keyframe seek before frame 4k, then decoding forward to
4k (and on to 4(k + gap) for a pair, in the same pass). Frame numbers come from the timestamps.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from pycocotools import mask as mask_utils

from dualrl.data.decode import BadSample, check_mask, rle_counts, rle_mask
from dualrl.data.sources.base import Shard, Source, require, skip

KINDS = ("manual", "auto")  # column 1 of a row: 0 manual, 1 auto
STEP = 4  # video frames per annotated frame
FPS = 24  # the videos' frame rate, which makes annotation k frame STEP * k
VIDEO_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError, TypeError, ZeroDivisionError)
NPZ_KEYS = ("frame1", "mask1", "frame2", "mask2")
SUFFIXES = (".mp4", "_manual.json", "_auto.json", ".npz")  # the files a shard is made of


def _files(folder: Path) -> dict[str, os.DirEntry]:
    """The SA-V files of one folder (not its sub-folders), by name."""
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it if e.name.endswith(SUFFIXES) and e.is_file()}
    except OSError:
        return {}


def _holds_files(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(e.name.endswith(SUFFIXES) and e.is_file() for e in it)
    except OSError:
        return False


def _is_npz_shard(names) -> bool:
    return any(n.endswith(".npz") for n in names) and not any(n.endswith(".json") for n in names)


def _rle_ok(rle: Any) -> bool:
    """A compressed RLE's structure: size [h, w] > 0 and counts of RLE characters not ending inside a run."""
    try:
        h, w = rle["size"]
        counts = rle["counts"]
        return (
            int(h) > 0
            and int(w) > 0
            and isinstance(counts, str)
            and counts.isascii()
            and counts != ""
            and min(counts) >= "0"
            and max(counts) <= "o"
            and counts[-1] < "P"
        )
    except (KeyError, TypeError, ValueError):
        return False


def _empty_rle_ok(rle: dict) -> bool:
    """An RLE of area 0 is an object out of view only when its runs are those of an h x w mask."""
    try:
        runs = rle_counts(rle["counts"])
    except ValueError:
        return False
    return min(runs, default=-1) >= 0 and sum(runs) == int(rle["size"][0]) * int(rle["size"][1])


def _read_annotations(path: Path) -> dict:
    """An SA-V JSON, its `masklet` checked to be a list (annotated frames) of lists (objects)."""
    with open(path, "rb") as f:
        doc = json.load(f)
    masklet = doc["masklet"]
    if not isinstance(masklet, list) or not all(isinstance(frame, list) for frame in masklet):
        raise ValueError("masklet is not a list of lists")
    return doc


def _read_masklet(path: Path) -> list:
    return _read_annotations(path)["masklet"]


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame count, frame rate, height and width."""

    frames: int
    fps: Fraction
    height: int
    width: int


def probe(path: Path) -> VideoInfo:
    """A video's header, without decoding a frame. Raises `BadSample` ("video_corrupt") when unreadable or
    silent on its frame count, rate or size."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = stream.frames  # mp4: from the sample table
            if not frames and stream.duration and rate:
                frames = round(stream.duration * stream.time_base * rate)
            height, width = stream.codec_context.height, stream.codec_context.width
    except VIDEO_ERRORS as err:
        raise BadSample("video_corrupt", f"{path}: {err!r}") from None
    if not (frames and rate and height and width):
        raise BadSample("video_corrupt", f"{path}: the header gives no frame count, frame rate or size")
    return VideoInfo(int(frames), Fraction(rate), int(height), int(width))


def masklet_problem(doc: dict, video: VideoInfo) -> tuple[str, str] | None:
    """(reason, detail) when an annotation file disagrees with its video (see the module docstring)."""
    masklet = doc["masklet"]
    expected = math.ceil(video.frames / STEP)
    if len(masklet) != expected:
        return "masklet_mismatch", (
            f"{len(masklet)} annotated frames; {video.frames} video frames annotated every {STEP}th make {expected}"
        )
    counts = sorted({len(frame) for frame in masklet})
    if len(counts) > 1:
        return "masklet_mismatch", f"annotated frames hold different numbers of objects ({counts})"
    size = (doc.get("video_height"), doc.get("video_width"))
    if size != (None, None):
        try:
            height, width = (float(v) for v in size)
        except (TypeError, ValueError):
            return "annotation_corrupt", f"video_height, video_width = {size!r}"
        if (height, width) != (video.height, video.width):
            actual = f"{video.height}x{video.width}"
            return "mask_size_mismatch", f"the JSON says {height:g}x{width:g} (h x w), the video is {actual}"
    return None


def _decode(container, stream, frames: list[int]) -> dict[int, np.ndarray]:
    """Frames `frames` (ascending video frame numbers, from the timestamps) of an open video: a seek to the
    keyframe before the first, then decoding forward to the last. Non-reference frames other than the
    targets are not decoded (skip_frame NONREF per packet: no frame depends on them; about 25% faster)."""
    fps, tb, start = stream.average_rate or stream.guessed_rate, stream.time_base, stream.start_time or 0

    def number(pts: int) -> int:
        return round((pts - start) * tb * fps)

    if frames[0] > 0:  # half a frame early, so that a rounded timestamp cannot land past the target
        container.seek(
            start + int((frames[0] - Fraction(1, 2)) / fps / tb), stream=stream, backward=True, any_frame=False
        )
    out: dict[int, np.ndarray] = {}
    for packet in container.demux(stream):
        if packet.pts is not None:
            stream.codec_context.skip_frame = "DEFAULT" if number(packet.pts) in frames else "NONREF"
        for frame in packet.decode():
            n = -1 if frame.pts is None else number(frame.pts)
            if n in frames:
                out[n] = frame.to_ndarray(format="rgb24")
            if n >= frames[-1]:
                return out
    return out


class SavSource(Source):
    name = "sav"

    def __init__(
        self,
        spec,
        size: int,
        split: str = "train",
        aspect: str = "squash",
        max_pixels: int = 1 << 28,
        cache_dir: str | None = None,
    ):
        super().__init__(spec, size, aspect, max_pixels, cache_dir)
        self.split = split  # SA-V train has no splits to choose from
        self.root = require(spec.root, "SA-V folder", "data.sav.root").resolve()

    def describe(self) -> str:
        return f"{self.name} ({self.root})"

    # --------------------------------------------------------------------------- training process
    def shards(self) -> list[str]:
        with os.scandir(self.root) as it:
            subdirs = sorted(e.name for e in it if e.is_dir())
        return ["."] * _holds_files(self.root) + [d for d in subdirs if _holds_files(self.root / d)]

    def shard_path(self, shard: str) -> Path:
        return self.root / shard

    def shard_stamp(self, shard: str) -> list:
        """Name, size and mtime of every file of the shard (edits in place do not change a folder's mtime)."""
        files = _files(self.shard_path(shard))
        return [str(self.shard_path(shard))] + [
            [n, e.stat().st_size, e.stat().st_mtime_ns] for n, e in sorted(files.items())
        ]

    def index_options(self) -> dict[str, Any]:
        return {
            "annotations": self.spec.annotations,
            "pair_gap": self.spec.pair_gap,
            "min_area": self.spec.min_area,
            "checks": 2,  # 2: annotations checked against their video; indexes built before are rebuilt
        }

    def build_shard(self, shard: str) -> Shard:
        """Video shards: rows uint32 [video ordinal in names, kind (0 manual, 1 auto), object, k, pair_ok].
        npz shards: a count (file ordinals in names)."""
        folder = self.shard_path(shard)
        files = _files(folder)
        if _is_npz_shard(files):
            names = sorted(n for n in files if n.endswith(".npz"))
            return Shard(len(names), names)
        kinds = [i for i, kind in enumerate(KINDS) if self.spec.annotations in (kind, "both")]
        stems = sorted({n.rsplit("_", 1)[0] for n in files for i in kinds if n.endswith(f"_{KINDS[i]}.json")})
        names: list[str] = []
        rows: list[np.ndarray] = []
        skipped: dict[str, int] = {}
        for stem in stems:
            if f"{stem}.mp4" not in files:
                skip(skipped, "video_missing", f"{folder / stem}.mp4 (annotated) does not exist", self.name)
                continue
            try:
                video = self._video(folder / f"{stem}.mp4")
            except BadSample as bad:
                skip(skipped, bad.reason, bad.detail, self.name)
                continue
            found = []
            for kind in kinds:
                path = folder / f"{stem}_{KINDS[kind]}.json"
                if path.name not in files:
                    continue
                try:
                    doc = _read_annotations(path)
                except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:  # JSONDecodeError, ...
                    skip(skipped, "annotation_corrupt", f"{path}: {err!r}", self.name)
                    continue
                problem = masklet_problem(doc, video)
                if problem is not None:
                    skip(skipped, problem[0], f"{path}: {problem[1]}", self.name)
                    continue
                found += [(kind, j, k, ok) for j, k, ok in self._visible(doc["masklet"], path, skipped)]
            if found:
                rows.append(np.array([(len(names), *row) for row in found], dtype=np.uint32))
                names.append(stem)
        table = np.concatenate(rows) if rows else np.zeros((0, 5), dtype=np.uint32)
        return Shard(table, names, skipped)

    def _video(self, path: Path) -> VideoInfo:
        """The video's header, at the frame rate its annotations assume; `BadSample` otherwise."""
        video = probe(path)
        if video.fps != FPS:
            detail = f"{path} is at {float(video.fps):g} fps; annotation k is frame {STEP}k only at {FPS} fps"
            raise BadSample("video_frame_rate", detail)
        return video

    def _visible(self, masklet: list, path: Path, skipped: dict[str, int]) -> list[tuple[int, int, int]]:
        """(object, annotation k, pair_ok) of every visible mask: min_area <= area < every pixel."""
        rles, where = [], []
        for k, frame in enumerate(masklet):
            for j, rle in enumerate(frame):
                if _rle_ok(rle):
                    rles.append(rle)
                    where.append((k, j, int(rle["size"][0]) * int(rle["size"][1])))
                else:
                    skip(skipped, "bad_rle", f"{path}: annotation {k}, object {j}: {str(rle)[:80]}", self.name)
        if not rles:
            return []
        k, j, pixels = np.array(where, dtype=np.int64).T
        area = mask_utils.area([{"size": [int(v) for v in r["size"]], "counts": r["counts"]} for r in rles])
        visible = np.zeros((len(masklet), int(j.max()) + 1), dtype=bool)
        visible[k, j] = (area >= max(1, self.spec.min_area)) & (area < pixels)
        # An all-zero RLE is an object out of view (normal), a malformed one of area 0 is not; full and tiny
        # masks are counted skips.
        malformed = np.zeros(len(rles), dtype=bool)
        for i in np.flatnonzero(area == 0):
            malformed[i] = not _empty_rle_ok(rles[i])
        small = (area > 0) & (area < self.spec.min_area)
        for reason, bad in (("bad_rle", malformed), ("full_mask", area >= pixels), ("mask_too_small", small)):
            if bad.any():
                first = int(np.argmax(bad))
                detail = f"{path}: {int(bad.sum())} mask(s), the first annotation {k[first]}, object {j[first]}"
                skip(skipped, reason, detail, self.name, n=int(bad.sum()))
        gap = self.spec.pair_gap
        later = np.zeros_like(visible)
        later[:-gap] = visible[gap:]
        return [(int(b), int(a), int(later[a, b])) for a, b in np.argwhere(visible)]

    def key(self, index: Shard, shard: str, i: int) -> tuple:
        folder = str(self.shard_path(shard))
        if isinstance(index.rows, int):
            return ("npz", os.path.join(folder, index.names[i]))
        video, kind, obj, k, pair_ok = (int(v) for v in index.rows[i])
        stem = os.path.join(folder, index.names[video])
        return ("video", f"{stem}.mp4", f"{stem}_{KINDS[kind]}.json", obj, k, pair_ok)

    # ----------------------------------------------------------------------------- worker process
    def load(self, key: tuple, seed: int) -> dict[str, Any]:
        if key[0] == "npz":
            return self._load_npz(key[1])
        _, video, annotations, obj, k, pair_ok = key
        pair = bool(np.random.default_rng(seed).random() < self.spec.pairs) and bool(pair_ok)
        steps = (0, self.spec.pair_gap) if pair else (0,)
        try:
            masklet = _read_masklet(Path(annotations))
            rles = [masklet[k + step][obj] for step in steps]
        except FileNotFoundError:
            raise BadSample("annotation_corrupt", f"{annotations} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise BadSample("annotation_corrupt", f"{annotations}: annotation {k}, object {obj}: {err!r}") from None
        masks = [check_mask(rle_mask(rle, max_pixels=self.max_pixels), self.spec.min_area) for rle in rles]
        frames = [STEP * (k + step) for step in steps]
        images = self._read_frames(video, frames, masks[0].shape)
        stem = Path(video).stem + (":auto" if annotations.endswith("_auto.json") else "")
        index = f"{stem}:obj{obj}:f{frames[0]}" + (f"+f{frames[1]}" if pair else "")
        sample = self.region(images[0], masks[0], index=index, expression=None, references=[])
        return self.pair(sample, images[1], masks[1]) if pair else sample

    def _read_frames(self, path: str, frames: list[int], hw: tuple[int, int]) -> list[np.ndarray]:
        """Video frames `frames` (ascending) as uint8 [H, W, 3], in one seek and one forward pass."""
        if not os.path.exists(path):
            raise BadSample("video_missing", f"{path} does not exist")
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                h, w = stream.codec_context.height, stream.codec_context.width
                if h * w > self.max_pixels:
                    raise BadSample("image_too_large", f"{path} is {w}x{h}, over data.max_image_pixels")
                if h * w and (h, w) != hw:  # (the decoded frames are checked against the masks again)
                    raise BadSample("mask_size_mismatch", f"{path} is {h}x{w} (h x w), its RLE {hw[0]}x{hw[1]}")
                out = _decode(container, stream, frames)
        except BadSample:
            raise
        except (av.FFmpegError, OSError, ValueError, IndexError, TypeError, ZeroDivisionError) as err:
            raise BadSample("video_corrupt", f"{path}: {err!r}") from None
        missing = [n for n in frames if n not in out]
        if missing:
            raise BadSample("video_corrupt", f"{path}: no frame {missing[0]} (ended or skipped it)")
        return [out[n] for n in frames]

    def _load_npz(self, path: str) -> dict[str, Any]:
        try:
            with np.load(path, allow_pickle=False) as z:
                f1, m1, f2, m2 = (z[name] for name in NPZ_KEYS)
        except FileNotFoundError:
            raise BadSample("video_missing", f"{path} does not exist") from None
        except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile) as err:
            raise BadSample("annotation_corrupt", f"{path}: {err!r}") from None
        for frame, mask in ((f1, m1), (f2, m2)):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or mask.ndim != 2:
                raise BadSample("annotation_corrupt", f"{path}: frame {frame.dtype} {frame.shape}, mask {mask.shape}")
            if frame.shape[:2] != mask.shape:
                raise BadSample("mask_size_mismatch", f"{path}: frame {frame.shape[:2]}, mask {mask.shape}")
            if frame.shape[0] * frame.shape[1] > self.max_pixels:
                raise BadSample("image_too_large", f"{path}: frame {frame.shape[:2]}")
        m1, m2 = (check_mask(m != 0, self.spec.min_area) for m in (m1, m2))
        sample = self.region(f1, m1, index=Path(path).stem, expression=None, references=[])
        return self.pair(sample, f2, m2)
