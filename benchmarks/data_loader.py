"""Data loading on the CPU: SA-1B throughput, where its sample's time goes and its index memory; the other sources.

    python benchmarks/data_loader.py [--images 200] [--image-size 1500x2250] [--masks 50] [--size 1024]
        [--samples 240] [--batch-size 8] [--rounds 2] [--workers 0 1 2] [--breakdown 50]
        [--index-files 10000] [--anns-per-file 100] [--files-per-shard 1000]
        [--refs 100] [--ref-images 40] [--ref-image-size 480x640]
        [--oi-annotations 100] [--oi-image-size 768x1024] [--oi-mask-size 384x512] [--zip-members 170000]
        [--videos 8] [--video-seconds 10] [--video-size 720x1280] [--gop 48] [--x264-preset faster] [--crf 21]
        [--grain 4] [--source-samples 192] [--video-samples 64] [--source-loads 40] [--video-loads 24]
        [--only throughput|index|sources] [--quick]

Everything is written into a temporary folder under /tmp, removed at the end. Section 2 runs first (so its
RSS figures come from a fresh process) and is printed second; section 3 runs last.

1. Throughput. `--images` SA-1B-format pictures (sa_<n>.jpg + sa_<n>.json) of `--image-size` (h x w; SA-1B's
   are ~1500 px on the short side), JPEG quality 90 with smooth random blobs and film grain (so the JPEG is
   photo-sized and its decode costs what a photo's does), each with `--masks` COCO-RLE annotations of varied
   size (irregular blobs from 0.05 % to 30 % of the image, drawn from a pool of distinct masks; every mask
   is kept by the default min_area 1024). The index is built (timed: what a training run does when the
   stream first reaches a shard), then `TrainBatches` produces batches of samples squashed to `--size` with
   num_workers = each of `--workers`, plus 0 and the most with torch at 1 thread in this process (when it
   has more; loader workers always run at 1), over the same draws (position 0), `--rounds` times interleaved;
   the best round is shown. The first batch (worker start-up included) is the warm-up, timed apart;
   samples/s is over the `--samples` after it, with the workers busy, so what they prefetched during the
   warm-up adds at most the sample each has in hand. "others" is the share of the machine's CPU time that
   other processes took meanwhile (this machine is shared: a high share means the row was slowed). Then one
   process's breakdown: the decode.py / transforms.py functions that `Sa1bSource.load` calls, timed directly
   on `--breakdown` samples after 3 warm-up loads (mean and median ms per sample).
2. Index memory. A synthetic SA-1B folder of `--index-files` JSON files (only the fields the index builder
   reads, short dummy RLE strings) of `--anns-per-file` annotations each, in sub-folders (shards) of
   `--files-per-shard` files, with empty .jpg placeholders. Every shard is indexed through
   `SourceStream(...).size()`: timed and measured by RSS (psutil, before/after and a 10 ms sampled peak),
   then again from JSON under tracemalloc (peak and held Python allocation), then read back from the
   on-disk cache (`cache_dir`) by a second stream (timed). Index bytes are `Shard.nbytes()` summed over all
   shards (the rows every shard would take if all were held) and over the shards the stream still holds at
   the end (it keeps the last 2, plus one start offset per shard). Baseline, same process and annotations:
   a Python list with one dict {"json": path, "ann": i} per annotation (the path string shared per file),
   sized by tracemalloc and RSS.
3. Other sources, at working size `--size` (squash), through their own `Source.load`:
   - RefCOCO (`refer` layout): `--refs` refs over `--ref-images` COCO-named JPEGs of `--ref-image-size` (q90,
     the pictures of section 1), one object per ref, a COCO polygon of 30-80 vertices (a fifth in two parts),
     1-3 sentences, in instances.json and a Python-2-style refs(unc).p (tests/data/make_refcoco.py's pickler);
   - OpenImages v7 (published layout): `--oi-annotations` masks over half as many `<ImageID>.jpg` of
     `--oi-image-size` (q90), each a mode-L PNG of `--oi-mask-size` (an irregular blob as in section 1, kept
     over min_area 256 at the image's size) in deflated `train-masks-<c>.zip` by the ImageID's first digit,
     plus the annotation and class CSVs. A zip's member table (`ZipTable`) is built once per loading process
     per zip: the first load of a fresh (pickled) copy of the source is timed apart, every fixture zip's
     table is built before the steady-state timing, and the table of a zip with `--zip-members` empty members
     (the central directory of a published zip, ~170 k members) is timed on its own;
   - SA-V (published layout, sav_000/): `--videos` videos of `--video-size`, `--video-seconds` at 24 fps,
     libx264 (`--x264-preset`, `--crf`; mpeg4 at 4 Mbit/s where PyAV has no libx264), a keyframe every
     `--gop` frames: a panning photo-like background, 3 textured blobs moving a few px per frame and
     temporal grain (`--grain`, sigma in levels), so that the bit rate and the decode cost are a real
     video's; a manual JSON with the 3 objects' RLE masks every 4th frame. Single frames (pairs=0, every
     row) and pairs (pairs=1, the rows with a frame 4 annotations later; frames 4k and 4k+16) apart.
   For each: `Source.load` in this process on `--source-loads` (`--video-loads` for SA-V) draws after 3
   warm-up loads (mean and median ms, samples/s), then `TrainBatches` with num_workers 0 and 2 over
   `--source-samples` (`--video-samples`) samples after a 1-batch warm-up, `--rounds` times interleaved,
   best shown; "others" as in section 1 (one process / workers=0 / workers=2, the worst round).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import io
import json
import logging
import os
import pickle
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dualrl.data.decode import check_mask, read_image, rle_counts, rle_mask
from dualrl.data.loader import TrainBatches
from dualrl.data.sources.base import Shard
from dualrl.data.sources.openimages import OpenImagesSource, ZipTable
from dualrl.data.sources.refcoco import RefCocoSource
from dualrl.data.sources.sa1b import Sa1bSource
from dualrl.data.sources.sav import SavSource
from dualrl.data.stream import Mixture, SourceStream
from dualrl.data.transforms import _resize_image, resize_mask, square
from dualrl.recipe import OpenImagesSpec, RefCocoSpec, Sa1bSpec, SavSpec

MAX_PIXELS = 64_000_000  # data.max_image_pixels' default


# --------------------------------------------------------------------------------------- fixtures
def picture(rng: np.random.Generator, h: int, w: int, grain: np.ndarray) -> np.ndarray:
    """Smooth random colour blobs at four scales, upsampled, plus film grain: uint8 [h, w, 3]."""
    lh, lw = max(8, h // 4), max(8, w // 4)
    acc = np.zeros((lh, lw, 3), np.float32)
    for cells, weight in ((3, 0.45), (12, 0.3), (48, 0.17), (192, 0.08)):
        gh = min(cells, lh)
        small = rng.integers(0, 256, (gh, max(1, gh * w // h), 3), dtype=np.uint8)
        acc += weight * np.asarray(Image.fromarray(small).resize((lw, lh), Image.BICUBIC), dtype=np.float32)
    out = np.asarray(Image.fromarray(acc.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.int16)
    y, x = rng.integers(0, 64, 2)
    out += grain[y : y + h, x : x + w, None]
    return np.clip(out, 0, 255).astype(np.uint8)


def blob_annotation(rng: np.random.Generator, h: int, w: int) -> dict:
    """One irregular blob (noisy ellipse) of 0.05 %..30 % of the image, as an SA-1B annotation sans id."""
    frac = float(np.exp(rng.uniform(np.log(5e-4), np.log(0.3))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    box = frac * h * w / 0.62  # a noisy ellipse fills ~0.6 of its box
    bh = int(np.clip(np.sqrt(box / aspect), 8, h - 1))
    bw = int(np.clip(box / bh, 8, w - 1))
    yy, xx = np.ogrid[-1 : 1 : bh * 1j, -1 : 1 : bw * 1j]
    small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    noise = np.asarray(Image.fromarray(small).resize((bw, bh), Image.BICUBIC), dtype=np.float32) / 255 - 0.5
    blob = (1 - yy**2 - xx**2 + 0.6 * noise) > 0.15
    if not blob.any():
        blob[bh // 2, bw // 2] = True
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    full = np.zeros((h, w), dtype=np.uint8, order="F")
    full[y0 : y0 + bh, x0 : x0 + bw] = blob
    enc = mask_utils.encode(full)
    ys, xs = np.nonzero(blob)
    return {
        "segmentation": {"size": [h, w], "counts": enc["counts"].decode("ascii")},
        "area": int(blob.sum()),
        "bbox": [x0 + int(xs.min()), y0 + int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
        "predicted_iou": round(float(rng.uniform(0.85, 1.0)), 6),
        "point_coords": [[float(x0 + xs.mean()), float(y0 + ys.mean())]],
        "crop_box": [0, 0, w, h],
        "stability_score": round(float(rng.uniform(0.9, 1.0)), 6),
    }


def write_sa1b(root: Path, images: int, h: int, w: int, masks: int, seed: int = 0) -> dict[str, float]:
    """`images` sa_<n>.jpg + sa_<n>.json under root; returns mean file sizes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 3, (h + 64, w + 64)).round().astype(np.int16)
    pool = [blob_annotation(rng, h, w) for _ in range(max(4 * masks, 64))]
    jpg = js = counts = 0
    for n in range(images):
        Image.fromarray(picture(rng, h, w, grain)).save(root / f"sa_{n}.jpg", quality=90)
        anns = [dict(pool[i], id=n * 1000 + j) for j, i in enumerate(rng.choice(len(pool), masks, replace=False))]
        record = {"image": {"image_id": n, "width": w, "height": h, "file_name": f"sa_{n}.jpg"}, "annotations": anns}
        (root / f"sa_{n}.json").write_text(json.dumps(record))
        jpg += (root / f"sa_{n}.jpg").stat().st_size
        js += (root / f"sa_{n}.json").stat().st_size
        counts += sum(len(a["segmentation"]["counts"]) for a in anns)
    return {"jpg_kb": jpg / images / 1e3, "json_kb": js / images / 1e3, "counts_chars": counts / images / masks}


def write_index_fixture(root: Path, files: int, anns: int, per_shard: int, h: int = 1500, w: int = 2250) -> int:
    """Annotation-only SA-1B JSON (the fields the index reads) + empty .jpg, in shard folders."""
    rng = np.random.default_rng(1)
    n = 0
    for f in range(files):
        folder = root / f"sa_{f // per_shard:06d}"
        if f % per_shard == 0:
            folder.mkdir(parents=True)
        areas = rng.integers(1024, 1_000_000, anns)
        items = ",".join(
            f'{{"area": {int(a)}, "id": {n + i}, "segmentation": {{"size": [{h}, {w}], "counts": "PPYo1T0N2M3"}}}}'
            for i, a in enumerate(areas)
        )
        (folder / f"sa_{f}.json").write_text(
            f'{{"image": {{"image_id": {f}, "width": {w}, "height": {h}, "file_name": "sa_{f}.jpg"}}, '
            f'"annotations": [{items}]}}'
        )
        (folder / f"sa_{f}.jpg").touch()
        n += anns
    return n


# ------------------------------------------------------------------------------------- measuring
def rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRss:
    """Samples this process's RSS every `every` seconds in a thread; `.peak` is the highest seen."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self._stop = every, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


class CpuShare:
    """Over a block: the share of the machine's CPU time that other processes (not this one or its reaped
    children, e.g. loader workers) used; a high value means the timings inside were disturbed."""

    BUSY = ("user", "nice", "system", "irq", "softirq", "steal")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> CpuShare:
        self.t, self.machine, self.own = time.perf_counter(), psutil.cpu_times(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t
        now = psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(self.machine, f) for f in self.BUSY)
        self.other = max(0.0, busy - (self._own() - self.own)) / (wall * (os.cpu_count() or 1))


def source(
    root: Path, size: int, cache_dir: Path | None = None, per_shard: int = 1000, min_area: int = 1024
) -> Sa1bSource:
    spec = Sa1bSpec(root=str(root), files_per_shard=per_shard, min_area=min_area)
    return Sa1bSource(
        spec, size=size, aspect="squash", max_pixels=MAX_PIXELS, cache_dir=str(cache_dir) if cache_dir else None
    )


# ------------------------------------------------------------------------------------ 1. throughput
def throughput(args, tmp: Path) -> None:
    h, w = args.hw
    root = tmp / "sa1b"
    t0 = time.perf_counter()
    sizes = write_sa1b(root, args.images, h, w, args.masks)
    t_write = time.perf_counter() - t0
    src = source(root, args.size, min_area=args.min_area)
    t0 = time.perf_counter()
    stream = SourceStream(src, seed=0)
    n = stream.size()
    t_index = time.perf_counter() - t0
    print(
        f"1. SA-1B loader throughput: {args.images} images {h}x{w} (h x w), JPEG q90 {sizes['jpg_kb']:.0f} KB, "
        f"JSON {sizes['json_kb']:.0f} KB with {args.masks} masks (RLE {sizes['counts_chars']:.0f} chars mean), "
        f"written in {t_write:.1f} s"
    )
    print(
        f"   index of {n} masks from JSON: {t_index:.2f} s = {1000 * t_index / args.images:.1f} ms per file, "
        f"{1e6 * t_index / n:.1f} us per mask"
    )
    print(
        f"   working size {args.size} (squash), batch {args.batch_size}, prefetch 4; {args.samples} samples "
        f"timed after a 1-batch warm-up"
    )
    print(
        f"   best of {args.rounds} rounds (configurations interleaved); 'others' = share of the machine's CPU "
        f"time used by other processes during that run"
    )
    print()
    print("   workers  torch threads (main)  samples/s  per process  warm-up batch s  others  vs workers=0")
    threads = torch.get_num_threads()
    configs = [(w, threads) for w in args.workers]
    configs += [(w, 1) for w in (0, max(args.workers)) if threads > 1 and w in args.workers and (w, 1) not in configs]
    batches = max(1, args.samples // args.batch_size)
    runs: dict[tuple[int, int], list[tuple[float, float, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for workers, main_threads in configs:
            torch.set_num_threads(main_threads)
            with CpuShare() as share:
                stream = SourceStream(source(root, args.size, min_area=args.min_area), seed=0)
                mixture = Mixture([stream], [1.0], seed=0)
                t0 = time.perf_counter()
                loader = TrainBatches([stream], mixture, args.batch_size, seed=0, num_workers=workers, prefetch=4)
                next(loader)
                t1 = time.perf_counter()
                for _ in range(batches):
                    batch = next(loader)
                t2 = time.perf_counter()
                assert batch["images"].shape == (args.batch_size, 3, args.size, args.size)
                assert not loader.skips.counts, loader.skips.counts  # no load-time skip: every draw is timed
                loader.close()
                del loader, batch
                gc.collect()
            torch.set_num_threads(threads)
            runs[workers, main_threads].append((batches * args.batch_size / (t2 - t1), t1 - t0, share.other))
    best = {c: max(r) for c, r in runs.items()}
    base = best.get((0, threads))
    for (workers, main_threads), (rate, warm, other) in best.items():
        ratio = f"{rate / base[0]:.2f}x" if base else "-"
        print(
            f"   {workers:7d}  {main_threads:20d}  {rate:9.1f}  {rate / max(1, workers):11.1f}  {warm:15.2f}  "
            f"{other:6.0%}  {ratio:>11}"
        )
    if (0, threads) in runs and (2, threads) in runs:
        each = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(runs[2, threads], runs[0, threads]))
        print(
            f"   workers=2 / workers=0: {best[2, threads][0] / base[0]:.2f}x best of rounds (each round: {each}); "
            f"{os.cpu_count()} CPUs, the training process draws keys and collates in both"
        )
    print()
    breakdown(args, root, stream)


def breakdown(args, root: Path, stream: SourceStream) -> None:
    """One process: the functions of Sa1bSource.load timed one by one, mean ms per sample."""
    src = stream.source
    keys = [stream.key(c) for c in range(args.breakdown + 3)]
    for key in keys[:3]:  # warm-up
        src.load(key, 0)
    keys = keys[3:]
    stages: dict[str, list[float]] = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        stages.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def to_chw(image):  # as `square` does it
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()

    threads = torch.get_num_threads()

    def parse(path):
        with open(path, "rb") as f:
            return json.load(f)

    with CpuShare() as share:
        for stem, ann_index in keys:
            record = timed("JSON parse (open + json.load)", parse, f"{stem}.json")
            info, seg = record["image"], record["annotations"][ann_index]["segmentation"]
            hw = (int(info["height"]), int(info["width"]))
            mask = timed(
                "RLE decode + validate (rle_mask + check_mask)",
                lambda s=seg, hw=hw: check_mask(rle_mask(s, *hw), src.spec.min_area),
            )
            timed("  of which rle_counts (Python validation)", rle_counts, seg["counts"])
            timed(
                "  of which pycocotools decode",
                lambda s=seg: mask_utils.decode({"size": s["size"], "counts": s["counts"].encode("ascii")}).astype(
                    bool
                ),
            )
            image = timed("JPEG decode (read_image)", read_image, f"{stem}.jpg", MAX_PIXELS, hw)
            timed(f"resize to {args.size} (square: image + mask + tensors)", square, image, mask, args.size, "squash")
            resized = timed("  of which image (_resize_image)", _resize_image, image, (args.size, args.size))
            timed("  of which mask (resize_mask)", resize_mask, mask, (args.size, args.size))
            timed(f"  of which HWC->CHW tensor (torch, {threads} threads)", to_chw, resized)
            torch.set_num_threads(1)
            timed("  (the same with torch at 1 thread, not in the sum)", to_chw, resized)
            torch.set_num_threads(threads)
            timed("Sa1bSource.load, end to end", src.load, (stem, ann_index), 0)
    parts = (
        "JSON parse (open + json.load)",
        "RLE decode + validate (rle_mask + check_mask)",
        "JPEG decode (read_image)",
        f"resize to {args.size} (square: image + mask + tensors)",
    )
    print(
        f"   breakdown, one process (torch threads {threads}), mean over {len(keys)} samples after 3 warm-up "
        f"loads; others {share.other:.0%}"
    )
    for name, times in stages.items():
        mean, median = 1000 * statistics.fmean(times), 1000 * statistics.median(times)
        print(f"   {name:<52} {mean:7.2f} ms   (median {median:6.2f})")
    total = sum(statistics.fmean(stages[p]) for p in parts)
    print(f"   {'sum of the four stages':<52} {1000 * total:7.2f} ms   = {1 / total:.1f} samples/s per process")
    print()


# ---------------------------------------------------------------------------------- 2. index memory
def index_memory(args, tmp: Path) -> None:
    root, cache = tmp / "sa1b-index", tmp / "cache"
    t0 = time.perf_counter()
    total = write_index_fixture(root, args.index_files, args.anns_per_file, args.files_per_shard)
    t_write = time.perf_counter() - t0
    shards = (args.index_files + args.files_per_shard - 1) // args.files_per_shard
    print(
        f"2. index memory: {total:,} annotations in {args.index_files:,} JSON files, {shards} shards of "
        f"{args.files_per_shard} files (written in {t_write:.1f} s)"
    )

    # a. build from JSON (writes the cache), timed, RSS before/after and sampled peak
    per_shard: list[int] = []
    src = source(root, args.size, cache, args.files_per_shard)
    plain = src.shard_index

    def recording(shard):
        built = plain(shard)
        per_shard.append(built.nbytes())
        return built

    src.shard_index = recording
    gc.collect()
    rss0 = rss()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        stream = SourceStream(src, seed=0)
        n = stream.size()
        t_build = time.perf_counter() - t0
    gc.collect()
    rss_held = rss() - rss0
    rss_peak = peak.peak - rss0
    all_rows = sum(per_shard)
    held_rows = sum(s.nbytes() for s in stream._cache.values())
    held_starts = sys.getsizeof(stream.starts) + sum(sys.getsizeof(s) for s in stream.starts)

    # b. again from JSON, under tracemalloc (slower: not timed)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    traced = SourceStream(source(root, args.size, None, args.files_per_shard), seed=0)
    assert traced.size() == n
    current, traced_peak = tracemalloc.get_traced_memory()
    traced_held, traced_peak = current - base, traced_peak - base
    del traced
    tracemalloc.stop()

    # c. read back from the on-disk cache: timed, then traced
    gc.collect()
    t0 = time.perf_counter()
    cached = SourceStream(source(root, args.size, cache, args.files_per_shard), seed=0)
    assert cached.size() == n and cached.starts == stream.starts
    t_cache = time.perf_counter() - t0
    last = len(stream.names) - 1
    assert np.array_equal(cached._index(last).rows, stream._index(last).rows)
    del cached
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cached = SourceStream(source(root, args.size, cache, args.files_per_shard), seed=0)
    cached.size()
    cached_held = tracemalloc.get_traced_memory()[0] - base
    del cached
    tracemalloc.stop()
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*.npz"))

    # d. naive baseline: one dict per annotation (RSS, then tracemalloc)
    def naive() -> list[dict]:
        items = []
        for f in range(args.index_files):
            path = str(root / f"sa_{f // args.files_per_shard:06d}" / f"sa_{f}.json")
            for i in range(args.anns_per_file):
                items.append({"json": path, "ann": i})
        return items

    gc.collect()
    rss0 = rss()
    items = naive()
    rss_naive = rss() - rss0
    assert len(items) == n
    del items
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    items = naive()
    naive_traced = tracemalloc.get_traced_memory()[0] - base
    del items
    tracemalloc.stop()

    print(f"   indexed {n:,} annotations (all kept: area >= min_area {src.spec.min_area})")
    print()
    print(f"   {'':<54} {'bytes':>13}   {'bytes/annotation':>16}")
    rows = [
        ("index rows of every shard, if all held (sum nbytes)", all_rows),
        ("held by the stream at the end (last 2 shards' nbytes)", held_rows),
        ("  + per-shard start offsets (Python list of ints)", held_starts),
        ("tracemalloc: held after indexing (JSON build)", traced_held),
        ("tracemalloc: peak during indexing (JSON build)", traced_peak),
        ("tracemalloc: held after reading the cache", cached_held),
        ("RSS increase after indexing (psutil)", rss_held),
        ("RSS peak increase while indexing (10 ms samples)", rss_peak),
        ("on-disk cache (.npz files)", cache_bytes),
        ("naive list of dicts: tracemalloc", naive_traced),
        ("naive list of dicts: RSS increase", rss_naive),
    ]
    for name, value in rows:
        print(f"   {name:<54} {value:13,d}   {value / n:16.2f}")
    print()
    print(
        f"   naive / index, all shards: {naive_traced / all_rows:.1f}x   naive / held by the stream: "
        f"{naive_traced / max(1, held_rows + held_starts):.0f}x"
    )
    print(
        f"   time: build from JSON {t_build:.2f} s ({1e6 * t_build / n:.2f} us/annotation, "
        f"{1000 * t_build / args.index_files:.2f} ms/file, cache writes included); "
        f"read from cache {t_cache:.3f} s ({t_build / t_cache:.0f}x faster)"
    )


# ---------------------------------------------------------------------------------- 3. other sources
def tests_on_path() -> None:
    """The fixture helpers live in tests/data (not installed): import them from the repository root."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def hw(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def no_grain(h: int, w: int) -> np.ndarray:
    return np.zeros((h + 64, w + 64), np.int16)


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
    tests_on_path()
    from tests.data.make_refcoco import py2_pickle, sentence

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
            sentences.append(sentence(sent_id, text if sent_id % 2 else text.decode()))
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


OI_CLASSES = {
    "/m/01g317": "Person",
    "/m/0k4j": "Car",
    "/m/0bt9lr": "Dog",
    "/m/04yx4": "Man",
    "/m/03bt1vf": "Woman",
    "/m/0dzct": "Human face",
    "/m/04bcr3": "Table, desk",
}


def write_openimages(
    root: Path, anns: int, images: int, h: int, w: int, mh: int, mw: int, min_area: int, seed: int = 3
) -> dict[str, Any]:
    """OpenImages v7 layout: `images` <ImageID>.jpg (q90, photo-like), `anns` mask PNGs (mode L, 0/255, mh x
    mw, a blob of 0.05 %..30 % of the picture) in deflated train-masks-<c>.zip, the annotation and class CSVs."""
    tests_on_path()
    from tests.data.make_openimages import HEADER

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 3, (h + 64, w + 64)).round().astype(np.int16)
    ids = [rng.bytes(8).hex() for _ in range(images)]
    jpg = png = 0
    for image_id in ids:
        Image.fromarray(picture(rng, h, w, grain)).save(root / "images" / f"{image_id}.jpg", quality=90)
        jpg += (root / "images" / f"{image_id}.jpg").stat().st_size
    labels = sorted(OI_CLASSES)
    lines, zips = [HEADER], {}
    for a in range(anns):
        image_id, label, box_id = ids[a % images], labels[int(rng.integers(len(labels)))], rng.bytes(4).hex()
        while True:  # keep it over min_area (counted at the image's size) with a margin
            ann = blob_annotation(rng, mh, mw)
            if ann["area"] * (h * w) / (mh * mw) >= 2 * max(1, min_area):
                break
        seg = ann["segmentation"]
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})
        buf = io.BytesIO()
        Image.fromarray(mask * np.uint8(255)).save(buf, "PNG")
        png += len(buf.getvalue())
        mask_path = f"{image_id}_{label.replace('/', '')}_{box_id}.png"
        c = image_id[0]
        if c not in zips:
            zips[c] = zipfile.ZipFile(root / "masks" / f"train-masks-{c}.zip", "w", zipfile.ZIP_DEFLATED)
        zips[c].writestr(mask_path, buf.getvalue())
        x, y, bw, bh = ann["bbox"]
        clicks = ";".join(f"{rng.uniform():.5f} {rng.uniform():.5f} {int(rng.integers(2))}" for _ in range(3))
        lines.append(
            f"{mask_path},{image_id},{label},{box_id},{x / mw:.6f},{(x + bw) / mw:.6f},{y / mh:.6f},"
            f"{(y + bh) / mh:.6f},{ann['predicted_iou']:.5f},{clicks}"
        )
    for z in zips.values():
        z.close()
    (root / "train-annotations-object-segmentation.csv").write_text("\n".join(lines) + "\n")
    (root / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f'{k},"{v}"\n' if "," in v else f"{k},{v}\n" for k, v in OI_CLASSES.items())
    )
    zipped = sum(p.stat().st_size for p in (root / "masks").glob("*.zip"))
    spec = {
        "annotations": str(root / "train-annotations-object-segmentation.csv"),
        "classes": str(root / "oidv7-class-descriptions.csv"),
        "images": str(root / "images"),
        "masks": str(root / "masks"),
    }
    return {
        "spec": spec,
        "jpg_kb": jpg / images / 1e3,
        "png_kb": png / anns / 1e3,
        "zips": len(zips),
        "zipped_kb": zipped / anns / 1e3,
    }


def write_padded_zip(path: Path, members: int, seed: int = 4) -> None:
    """A zip with `members` empty stored members named like OpenImages masks: the central directory of a
    published train-masks-<c>.zip, without its data."""
    rng = np.random.default_rng(seed)
    names = [f"{h[:16]}_m0k4j_{h[16:]}.png" for h in (rng.bytes(12).hex() for _ in range(members))]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name in names:
            z.writestr(name, b"")


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
    fps: int = 24,
) -> list[list[dict]]:
    """A 24 fps video of a panning photo-like background with `objects` textured blobs moving over it (a few
    px per frame) and temporal film grain; returns the masklet of every 4th frame (one RLE per object, each
    occluded by the objects drawn after it)."""
    tests_on_path()
    from tests.data.make_sav import CODEC, rle

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
        stream = out.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        if CODEC == "libx264":
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
                masklet.append([rle(m) for m in masks])
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
    tests_on_path()
    from tests.data.make_sav import CODEC, write_json

    folder = root / "sav_000"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    frames = round(seconds * 24)
    mp4 = js = 0
    for n in range(videos):
        stem = f"sav_{n:06d}"
        masklet = write_video(folder / f"{stem}.mp4", rng, h, w, frames, gop, preset, crf, grain_sigma)
        write_json(folder / f"{stem}_manual.json", stem, masklet, "manual", frames, h, w)
        mp4 += (folder / f"{stem}.mp4").stat().st_size
        js += (folder / f"{stem}_manual.json").stat().st_size
    codec = f"libx264 preset {preset} crf {crf}" if CODEC == "libx264" else "mpeg4 4 Mbit/s (no libx264)"
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


def cpu_seconds() -> float:
    """This process's CPU time (all its threads; not its children)."""
    t = os.times()
    return t.user + t.system


def load_times(src, stream: SourceStream, loads: int, warmup: int = 3) -> tuple[list[float], float, float, dict]:
    """`Source.load` of draws 0..warmup+loads-1 in this process (seed = draw, as TrainBatches at seed 0): the
    seconds of the last `loads`, the others' CPU share meanwhile, the cores used (CPU time / wall time) and
    the last sample."""
    keys = [(stream.key(c), c) for c in range(warmup + loads)]
    for key, seed in keys[:warmup]:
        sample = src.load(key, seed)
    times = []
    with CpuShare() as share:
        cpu = cpu_seconds()
        for key, seed in keys[warmup:]:
            t0 = time.perf_counter()
            sample = src.load(key, seed)
            times.append(time.perf_counter() - t0)
        cpu = cpu_seconds() - cpu
    return times, share.other, cpu / sum(times), sample


def loader_rate(
    make, workers: int, samples: int, batch_size: int, size: int, pairs: bool
) -> tuple[float, float, float, float]:
    """TrainBatches over one source: samples/s over `samples` after a 1-batch warm-up, warm-up s, others, and
    the training process's CPU seconds per sample meanwhile (workers excluded)."""
    batches = max(1, samples // batch_size)
    with CpuShare() as share:
        stream = SourceStream(make(), seed=0)
        mixture = Mixture([stream], [1.0], seed=0)
        t0 = time.perf_counter()
        loader = TrainBatches([stream], mixture, batch_size, seed=0, num_workers=workers, prefetch=4)
        next(loader)
        t1, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            batch = next(loader)
        t2, cpu = time.perf_counter(), cpu_seconds() - cpu
        assert batch["images"].shape == (batch_size, 3, size, size)
        assert ("seg_images" in batch) == pairs
        assert not loader.skips.counts, loader.skips.counts
        loader.close()
        del loader, batch
        gc.collect()
    return batches * batch_size / (t2 - t1), t1 - t0, share.other, cpu / (batches * batch_size)


def other_sources(args, tmp: Path) -> None:
    size, common = args.size, {"aspect": "squash", "max_pixels": MAX_PIXELS}
    print(
        f"3. other sources: one process's Source.load, then TrainBatches with num_workers 0 and 2; working size "
        f"{size} (squash), batch {args.batch_size}, prefetch 4"
    )

    # fixtures
    t0 = time.perf_counter()
    (rh, rw), refs_images = hw(args.ref_image_size), max(1, min(args.ref_images, args.refs))
    ref = write_refcoco(tmp / "refcoco", args.refs, refs_images, rh, rw)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    (oh, ow), (mh, mw), oi_images = hw(args.oi_image_size), hw(args.oi_mask_size), max(1, args.oi_annotations // 2)
    oi_min_area = OpenImagesSpec.model_fields["min_area"].default
    oi = write_openimages(tmp / "openimages", args.oi_annotations, oi_images, oh, ow, mh, mw, oi_min_area)
    t_oi = time.perf_counter() - t0
    t0 = time.perf_counter()
    padded = tmp / "zip-table" / "train-masks-0.zip"
    padded.parent.mkdir()
    write_padded_zip(padded, args.zip_members)
    t_pad = time.perf_counter() - t0
    t0 = time.perf_counter()
    vh, vw = hw(args.video_size)
    sav = write_sav(
        tmp / "sav", args.videos, args.video_seconds, vh, vw, args.gop, args.x264_preset, args.crf, args.grain
    )
    t_sav = time.perf_counter() - t0
    print(
        f"   RefCOCO: {args.refs} refs over {refs_images} images {rh}x{rw} (h x w), JPEG q90 {ref['jpg_kb']:.0f} KB; "
        f"polygons of {ref['vertices']:.0f} vertices mean (30-80, a fifth in 2 parts); refs(unc).p "
        f"{ref['pickle_kb']:.0f} KB (Python 2 pickle), instances.json {ref['json_kb']:.0f} KB; written in "
        f"{t_ref:.1f} s"
    )
    print(
        f"   OpenImages v7: {args.oi_annotations} masks over {oi_images} images {oh}x{ow}, JPEG q90 "
        f"{oi['jpg_kb']:.0f} KB; mask PNGs {mh}x{mw} mode L ({oi['png_kb']:.1f} KB mean, {oi['zipped_kb']:.1f} KB "
        f"deflated) in {oi['zips']} train-masks-<c>.zip; min_area {oi_min_area}; written in {t_oi:.1f} s"
    )
    print(
        f"   SA-V: {args.videos} videos {vh}x{vw}, {args.video_seconds:g} s at 24 fps ({sav['frames']} frames), "
        f"{sav['codec']}, keyframe every {args.gop} frames, panning background + 3 moving textured blobs + "
        f"grain (sigma {args.grain:g}): {sav['mp4_mb']:.1f} MB = {sav['mbps']:.1f} Mbit/s; manual JSON "
        f"{sav['json_kb']:.0f} KB (3 objects every 4th frame); pair_gap 4 (frames 4k and 4k+16); written in "
        f"{t_sav:.1f} s"
    )

    def refcoco():
        return RefCocoSource(RefCocoSpec(**ref["spec"]), size, **common)

    def openimages():
        return OpenImagesSource(OpenImagesSpec(**oi["spec"]), size, **common)

    def sav_single():
        return SavSource(SavSpec(**sav["spec"], pairs=0.0), size, **common)

    def sav_pair():
        return SavPairRows(SavSpec(**sav["spec"], pairs=1.0), size, **common)

    rows = [
        ("RefCOCO", "polygon + JPEG", refcoco, args.source_samples, args.source_loads, False),
        ("OpenImages", "zip PNG + JPEG", openimages, args.source_samples, args.source_loads, False),
        ("SA-V", "frame (pairs=0)", sav_single, args.video_samples, args.video_loads, False),
        ("SA-V", "pair (pairs=1)", sav_pair, args.video_samples, args.video_loads, True),
    ]

    # one process
    single: dict[str, tuple[list[float], float, float]] = {}
    notes, zip_notes = [], []
    quiet = logging.getLogger("dualrl.data.sources.base")  # index-time skips are counted below instead
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    for name, kind, make, _, loads, pairs in rows:
        src = make()
        stream = SourceStream(src, seed=0)
        t0 = time.perf_counter()
        n = stream.size()
        t_index = time.perf_counter() - t0
        if name == "OpenImages":
            fresh = pickle.loads(pickle.dumps(src))  # as a spawned worker gets it: no zip table yet
            key = stream.key(0)
            t0 = time.perf_counter()
            fresh.load(key, 0)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            fresh.load(key, 0)
            t_again = time.perf_counter() - t0
            zips = sorted(Path(oi["spec"]["masks"]).glob("*.zip"))
            t0 = time.perf_counter()
            for path in zips:
                src._zip(path)  # every table built before the steady-state timing
            t_tables = time.perf_counter() - t0
            t0 = time.perf_counter()
            table = ZipTable(padded)
            t_big = time.perf_counter() - t0
            big_bytes = table.names.nbytes + table.entries.nbytes
            del table
            zip_notes += [
                "   OpenImages zip member tables (ZipTable: built in each loading process, per zip, at its first use):",
                f"     first load, fresh copy of the source (pickled, as a worker gets it) {1000 * t_first:.1f} ms, "
                f"the same key again {1000 * t_again:.1f} ms",
                f"     the {len(zips)} fixture zips ({args.oi_annotations / len(zips):.0f} members each): "
                f"{1000 * t_tables:.1f} ms in all (built before the steady-state timing below)",
                f"     a published-size zip ({args.zip_members:,} empty members, written in {t_pad:.1f} s): "
                f"{1000 * t_big:.0f} ms, table {big_bytes / 2**20:.1f} MiB; x 16 zips = ~{16 * t_big:.0f} s and "
                f"~{16 * big_bytes / 2**20:.0f} MiB per loading process (each worker; the training process with "
                f"workers=0), spread over its first loads",
            ]
        times, other, cores, sample = load_times(src, stream, loads)
        assert sample["image"].shape == (3, size, size) and ("seg_image" in sample) == pairs
        single[name + kind] = (times, other, cores)
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(stream.skipped.items())) or "none"
        notes.append(
            f"   {name} {kind}: index of {n} samples built in {1000 * t_index:.0f} ms (training process); "
            f"skipped while indexing: {skipped}"
        )
        del src, stream

    # loader throughput, configurations interleaved, best of rounds
    runs: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for name, kind, make, samples, _, pairs in rows:
                for workers in (0, 2):
                    runs.setdefault((name + kind, workers), []).append(
                        loader_rate(make, workers, samples, args.batch_size, size, pairs)
                    )
    finally:
        quiet.setLevel(level)
    print(
        f"   one process: Source.load timed on {args.source_loads} (images) / {args.video_loads} (video) draws "
        f"after 3 warm-up loads (torch threads {torch.get_num_threads()}); loader: {args.source_samples} / "
        f"{args.video_samples} samples after a 1-batch warm-up, best of {args.rounds} rounds (interleaved)"
    )
    print(
        "   cores = CPU time / wall time of the one-process loads (more than 1: the decoder's own threads); "
        "main CPU = the training process's"
    )
    print(
        "   CPU ms per sample in the loader runs (workers=0: loading and collating; workers=2: receiving from the "
        "workers and collating);"
    )
    print(
        "   others = share of the machine's CPU time used by other processes (one process / workers=0 / workers=2, "
        "the worst round)"
    )
    print()
    print(f"   {'':<30} {'one process':-^39}   {'TrainBatches, samples/s':-^31}   {'main CPU ms':>11}")
    print(
        f"   {'source':<11} {'sample':<18} {'ms/sample':>9} {'median':>7} {'samples/s':>10} {'cores':>6}   "
        f"{'workers=0':>9} {'workers=2':>10} {'2 / 0':>8}   {'w=0':>5} {'w=2':>5}   others"
    )
    for name, kind, *_ in rows:
        times, other, cores = single[name + kind]
        mean, median = 1000 * statistics.fmean(times), 1000 * statistics.median(times)
        w0, w2 = (max(runs[name + kind, w]) for w in (0, 2))
        o0, o2 = (max(r[2] for r in runs[name + kind, w]) for w in (0, 2))
        print(
            f"   {name:<11} {kind:<18} {mean:9.1f} {median:7.1f} {1000 / mean:10.1f} {cores:6.2f}   "
            f"{w0[0]:9.1f} {w2[0]:10.1f} {w2[0] / w0[0]:7.2f}x   {1000 * w0[3]:5.1f} {1000 * w2[3]:5.1f}   "
            f"{other:.0%} / {o0:.0%} / {o2:.0%}"
        )
    print()
    notes += zip_notes
    for name, kind, *_ in rows:
        each = ", ".join(f"{a[0]:.1f}/{b[0]:.1f}" for a, b in zip(runs[name + kind, 0], runs[name + kind, 2]))
        warm = max(r[1] for r in runs[name + kind, 2])
        notes.append(
            f"   {name} {kind}: samples/s workers=0/workers=2 each round: {each}; warm-up batch with 2 "
            f"workers at most {warm:.2f} s"
        )
    print("\n".join(notes))
    worst = max([o for _, o, _ in single.values()] + [r[2] for rs in runs.values() for r in rs])
    if worst > 0.1 and not args.quick:  # (tiny runs: a few ms, below the resolution of CPU times)
        print(f"   NOTE: other processes took up to {worst:.0%} of the CPU during a timed run: re-run")
    print()


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", default="1500x2250", help="h x w of the written images")
    parser.add_argument("--masks", type=int, default=50, help="annotations per image")
    parser.add_argument("--size", type=int, default=1024, help="working size (squash)")
    parser.add_argument("--samples", type=int, default=240, help="samples timed per worker count")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every worker count (best is shown)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--breakdown", type=int, default=50, help="samples of the one-process breakdown")
    parser.add_argument("--min-area", type=int, default=1024, help="Sa1bSpec.min_area (its default)")
    parser.add_argument("--index-files", type=int, default=10_000)
    parser.add_argument("--anns-per-file", type=int, default=100)
    parser.add_argument("--files-per-shard", type=int, default=1000)
    parser.add_argument("--refs", type=int, default=100, help="RefCOCO refs (one object each)")
    parser.add_argument("--ref-images", type=int, default=40, help="RefCOCO images the refs are spread over")
    parser.add_argument("--ref-image-size", default="480x640", help="h x w of the RefCOCO (COCO) images")
    parser.add_argument("--oi-annotations", type=int, default=100, help="OpenImages masks (over half as many images)")
    parser.add_argument("--oi-image-size", default="768x1024", help="h x w of the OpenImages images")
    parser.add_argument("--oi-mask-size", default="384x512", help="h x w of the OpenImages mask PNGs")
    parser.add_argument(
        "--zip-members",
        type=int,
        default=170_000,
        help="members of the published-size zip whose "
        "member table is timed (a published train-masks-<c>.zip has ~170k)",
    )
    parser.add_argument("--videos", type=int, default=8, help="SA-V videos")
    parser.add_argument("--video-seconds", type=float, default=10.0)
    parser.add_argument("--video-size", default="720x1280", help="h x w of the SA-V videos")
    parser.add_argument("--gop", type=int, default=48, help="SA-V keyframe interval (frames)")
    parser.add_argument("--x264-preset", default="faster", help="libx264 preset of the SA-V videos")
    parser.add_argument("--crf", type=int, default=21, help="libx264 crf of the SA-V videos")
    parser.add_argument("--grain", type=float, default=4.0, help="sigma of the SA-V videos' temporal grain (levels)")
    parser.add_argument(
        "--source-samples", type=int, default=192, help="RefCOCO/OpenImages samples timed per worker count"
    )
    parser.add_argument("--video-samples", type=int, default=64, help="SA-V samples timed per worker count")
    parser.add_argument("--source-loads", type=int, default=40, help="RefCOCO/OpenImages one-process loads timed")
    parser.add_argument("--video-loads", type=int, default=24, help="SA-V one-process loads timed (per kind)")
    parser.add_argument("--only", choices=["throughput", "index", "sources"])
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check that the script works")
    args = parser.parse_args()
    # `square` makes its tensor from PIL's read-only array (then copies it): torch warns once; harmless here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if args.quick:
        args.images, args.image_size, args.masks, args.size, args.min_area = 6, "300x450", 8, 256, 16
        args.samples, args.batch_size, args.breakdown, args.rounds = 16, 4, 8, 1
        args.index_files, args.anns_per_file, args.files_per_shard = 300, 20, 100
        args.refs, args.ref_images, args.ref_image_size = 8, 4, "120x160"
        args.oi_annotations, args.oi_image_size, args.oi_mask_size, args.zip_members = 8, "192x256", "96x128", 500
        args.videos, args.video_seconds, args.video_size, args.gop = 2, 2.0, "144x256", 12
        args.source_samples, args.video_samples, args.source_loads, args.video_loads = 8, 8, 4, 3
    args.hw = tuple(int(v) for v in args.image_size.lower().split("x"))

    packages = ("numpy", "pillow", "pycocotools", "torch", "av")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    print(f"$ python {shlex.join(sys.argv)}")
    print(
        f"{datetime.date.today()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"python {platform.python_version()}, {versions}"
    )
    print()
    tmp = Path(tempfile.mkdtemp(prefix="dualrl-data-bench-", dir="/tmp"))
    try:
        index_out = io.StringIO()
        if args.only in (None, "index"):  # first, so that RSS is measured in a fresh process; printed second
            with contextlib.redirect_stdout(index_out if args.only is None else sys.stdout):
                index_memory(args, tmp)
        if args.only in (None, "throughput"):
            throughput(args, tmp)
        print(index_out.getvalue(), end="")
        if args.only in (None, "sources"):
            if args.only is None:
                print()
            other_sources(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
