"""SA-V in its published layout: photo-like H.264 videos with moving textured objects and their manual JSON."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from dualrl.data.fixtures import (
    VIDEO_CODEC,
    VIDEO_FPS,
    coco_rle,
    write_sav_json,
)
from dualrl.data.sources.base import Shard
from dualrl.data.sources.sav import SavSource
from dualrl.recipe import SavSpec

from .common import MAX_PIXELS, Row, hw, no_grain, picture


def write_video(
    path: Path,
    rng: np.random.Generator,
    h: int,
    w: int,
    frames: int,
    gop: int,
    preset: str,
    crf: int,
    grain_sigma: float,
    objects: int = 3,
    fps: int = VIDEO_FPS,
) -> list[list[dict]]:
    """A 24 fps video of a panning photo-like background with `objects` textured blobs moving over it (a few
    px per frame) and temporal film grain; returns the masklet of every 4th frame (one RLE per object, each
    occluded by the objects drawn after it)."""
    pad = 64

    def headroom(img: np.ndarray) -> np.ndarray:  # 8..247, so that grain of +-8 added in uint8 cannot wrap
        return (8 + img.astype(np.uint16) * 239 // 255).astype(np.uint8)

    bg = headroom(picture(rng, h + 2 * pad, w + 2 * pad, no_grain(h + 2 * pad, w + 2 * pad)))
    grain = np.clip(rng.normal(0, grain_sigma, (h + 64, w + 64)).round(), -8, 8).astype(np.int8).view(np.uint8)
    things = []
    for _ in range(objects):
        bh = int(np.clip(h * rng.uniform(0.12, 0.4), 24, h - 2))
        bw = int(np.clip(bh * np.exp(rng.uniform(np.log(0.5), np.log(2.0))), 24, w // 2))
        yy, xx = np.ogrid[-1 : 1 : bh * 1j, -1 : 1 : bw * 1j]
        small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
        noise = np.asarray(Image.fromarray(small).resize((bw, bh), Image.BICUBIC), dtype=np.float32) / 255 - 0.5
        shape = (1 - yy**2 - xx**2 + 0.6 * noise) > 0.15
        texture = headroom(picture(rng, bh, bw, no_grain(bh, bw)))
        periods = rng.uniform(6, 20, 2) * fps
        things.append((shape, texture, bh, bw, periods, rng.uniform(0, 2 * np.pi, 2)))
    masklet = []
    frame = np.empty((h, w, 3), np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        if VIDEO_CODEC == "libx264":
            stream.options = {"crf": str(crf), "preset": preset, "keyint_min": str(gop)}
        else:
            stream.bit_rate = 4_000_000
        for i in range(frames):
            oy = pad + int(pad * np.sin(2 * np.pi * i / (10 * fps)))
            ox = pad + int(pad * np.cos(2 * np.pi * i / (13 * fps)))
            np.copyto(frame, bg[oy : oy + h, ox : ox + w])
            placed = []
            for shape, texture, bh, bw, periods, phases in things:
                y0 = int((h - bh) / 2 * (1 + np.sin(2 * np.pi * i / periods[0] + phases[0])))
                x0 = int((w - bw) / 2 * (1 + np.sin(2 * np.pi * i / periods[1] + phases[1])))
                np.copyto(frame[y0 : y0 + bh, x0 : x0 + bw], texture, where=shape[..., None])
                placed.append((y0, x0))
            if i % 4 == 0:
                masks = []
                for (shape, _, bh, bw, _, _), (y0, x0) in zip(things, placed):
                    full = np.zeros((h, w), dtype=bool)
                    full[y0 : y0 + bh, x0 : x0 + bw] = shape
                    for earlier in masks:
                        earlier &= ~full
                    masks.append(full)
                masklet.append([coco_rle(m) for m in masks])
            y, x = rng.integers(0, 64, 2)
            frame += grain[y : y + h, x : x + w, None]  # wraps in uint8: a signed add, thanks to the headroom
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return masklet


def write_sav(
    root: Path,
    videos: int,
    seconds: float,
    h: int,
    w: int,
    gop: int,
    preset: str,
    crf: int,
    grain_sigma: float,
    seed: int = 5,
) -> dict[str, Any]:
    """sav_000/sav_<n>.mp4 + sav_<n>_manual.json (3 objects, every 4th frame) under root."""
    folder = root / "sav_000"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    frames = round(seconds * VIDEO_FPS)
    mp4 = js = 0
    for n in range(videos):
        stem = f"sav_{n:06d}"
        masklet = write_video(folder / f"{stem}.mp4", rng, h, w, frames, gop, preset, crf, grain_sigma)
        write_sav_json(folder / f"{stem}_manual.json", stem, masklet, "manual", frames, h, w)
        mp4 += (folder / f"{stem}.mp4").stat().st_size
        js += (folder / f"{stem}_manual.json").stat().st_size
    codec = f"libx264 preset {preset} crf {crf}" if VIDEO_CODEC == "libx264" else "mpeg4 4 Mbit/s (no libx264)"
    return {
        "spec": {"root": str(root)},
        "mp4_mb": mp4 / videos / 1e6,
        "mbps": mp4 * 8 / videos / seconds / 1e6,
        "json_kb": js / videos / 1e3,
        "frames": frames,
        "codec": codec,
    }


class SavPairRows(SavSource):
    """SavSource keeping only the rows that can make a pair, so that with pairs=1 every sample is a pair."""

    def build_shard(self, shard: str) -> Shard:
        built = super().build_shard(shard)
        return Shard(built.rows[built.rows[:, 4] == 1], built.names, built.skipped)


def write_fixture(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The fixture of `--videos` videos, timed; its "line" describes it."""
    t0 = time.perf_counter()
    h, w = hw(args.video_size)
    sav = write_sav(
        tmp / "sav", args.videos, args.video_seconds, h, w, args.gop, args.x264_preset, args.crf, args.grain
    )
    sav["line"] = (
        f"   SA-V: {args.videos} videos {h}x{w}, {args.video_seconds:g} s at {VIDEO_FPS} fps ({sav['frames']} "
        f"frames), {sav['codec']}, keyframe every {args.gop} frames, panning background + 3 moving textured blobs "
        f"+ grain (sigma {args.grain:g}): {sav['mp4_mb']:.1f} MB = {sav['mbps']:.1f} Mbit/s; manual JSON "
        f"{sav['json_kb']:.0f} KB (3 objects every 4th frame); pair_gap 4 (frames 4k and 4k+16); written in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return sav


def rows(fixture: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Single frames (pairs=0, every row) and pairs (pairs=1, only the rows that make one) apart."""

    def single() -> SavSource:
        return SavSource(SavSpec(**fixture["spec"], pairs=0.0), args.size, aspect="squash", max_pixels=MAX_PIXELS)

    def pair() -> SavPairRows:
        return SavPairRows(SavSpec(**fixture["spec"], pairs=1.0), args.size, aspect="squash", max_pixels=MAX_PIXELS)

    return [
        Row("SA-V", "frame (pairs=0)", single, args.video_samples, args.video_loads, False),
        Row("SA-V", "pair (pairs=1)", pair, args.video_samples, args.video_loads, True),
    ]
