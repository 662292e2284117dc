"""SA-1B loading on the CPU: loader throughput, where a sample's time goes, and the memory of the index.

    python benchmarks/data_loader.py [--images 200] [--image-size 1500x2250] [--masks 50] [--size 1024]
        [--samples 240] [--batch-size 8] [--rounds 2] [--workers 0 1 2] [--breakdown 50]
        [--index-files 10000] [--anns-per-file 100] [--files-per-shard 1000] [--only throughput|index] [--quick]

Everything is written into a temporary folder under /tmp, removed at the end. Section 2 runs first (so its
RSS figures come from a fresh process) and is printed second.

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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import io
import json
import os
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
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dualrl.data.decode import check_mask, read_image, rle_counts, rle_mask
from dualrl.data.loader import TrainBatches
from dualrl.data.sources.sa1b import Sa1bSource
from dualrl.data.stream import Mixture, SourceStream
from dualrl.data.transforms import _resize_image, resize_mask, square
from dualrl.recipe import Sa1bSpec

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
    out += grain[y:y + h, x:x + w, None]
    return np.clip(out, 0, 255).astype(np.uint8)


def blob_annotation(rng: np.random.Generator, h: int, w: int) -> dict:
    """One irregular blob (noisy ellipse) of 0.05 %..30 % of the image, as an SA-1B annotation sans id."""
    frac = float(np.exp(rng.uniform(np.log(5e-4), np.log(0.3))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    box = frac * h * w / 0.62  # a noisy ellipse fills ~0.6 of its box
    bh = int(np.clip(np.sqrt(box / aspect), 8, h - 1))
    bw = int(np.clip(box / bh, 8, w - 1))
    yy, xx = np.ogrid[-1:1:bh * 1j, -1:1:bw * 1j]
    small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    noise = np.asarray(Image.fromarray(small).resize((bw, bh), Image.BICUBIC), dtype=np.float32) / 255 - 0.5
    blob = (1 - yy**2 - xx**2 + 0.6 * noise) > 0.15
    if not blob.any():
        blob[bh // 2, bw // 2] = True
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    full = np.zeros((h, w), dtype=np.uint8, order="F")
    full[y0:y0 + bh, x0:x0 + bw] = blob
    enc = mask_utils.encode(full)
    ys, xs = np.nonzero(blob)
    return {"segmentation": {"size": [h, w], "counts": enc["counts"].decode("ascii")}, "area": int(blob.sum()),
            "bbox": [x0 + int(xs.min()), y0 + int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
            "predicted_iou": round(float(rng.uniform(0.85, 1.0)), 6),
            "point_coords": [[float(x0 + xs.mean()), float(y0 + ys.mean())]], "crop_box": [0, 0, w, h],
            "stability_score": round(float(rng.uniform(0.9, 1.0)), 6)}


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
        record = {"image": {"image_id": n, "width": w, "height": h, "file_name": f"sa_{n}.jpg"},
                  "annotations": anns}
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
        items = ",".join(f'{{"area": {int(a)}, "id": {n + i}, "segmentation": {{"size": [{h}, {w}], '
                         f'"counts": "PPYo1T0N2M3"}}}}' for i, a in enumerate(areas))
        (folder / f"sa_{f}.json").write_text(
            f'{{"image": {{"image_id": {f}, "width": {w}, "height": {h}, "file_name": "sa_{f}.jpg"}}, '
            f'"annotations": [{items}]}}')
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


def source(root: Path, size: int, cache_dir: Path | None = None, per_shard: int = 1000, min_area: int = 1024
           ) -> Sa1bSource:
    spec = Sa1bSpec(root=str(root), files_per_shard=per_shard, min_area=min_area)
    return Sa1bSource(spec, size=size, aspect="squash",
                      max_pixels=MAX_PIXELS, cache_dir=str(cache_dir) if cache_dir else None)


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
    print(f"1. SA-1B loader throughput: {args.images} images {h}x{w} (h x w), JPEG q90 {sizes['jpg_kb']:.0f} KB, "
          f"JSON {sizes['json_kb']:.0f} KB with {args.masks} masks (RLE {sizes['counts_chars']:.0f} chars mean), "
          f"written in {t_write:.1f} s")
    print(f"   index of {n} masks from JSON: {t_index:.2f} s = {1000 * t_index / args.images:.1f} ms per file, "
          f"{1e6 * t_index / n:.1f} us per mask")
    print(f"   working size {args.size} (squash), batch {args.batch_size}, prefetch 4; {args.samples} samples "
          f"timed after a 1-batch warm-up")
    print(f"   best of {args.rounds} rounds (configurations interleaved); 'others' = share of the machine's CPU "
          f"time used by other processes during that run")
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
        print(f"   {workers:7d}  {main_threads:20d}  {rate:9.1f}  {rate / max(1, workers):11.1f}  {warm:15.2f}  "
              f"{other:6.0%}  {ratio:>11}")
    if (0, threads) in runs and (2, threads) in runs:
        each = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(runs[2, threads], runs[0, threads]))
        print(f"   workers=2 / workers=0: {best[2, threads][0] / base[0]:.2f}x best of rounds (each round: {each}); "
              f"{os.cpu_count()} CPUs, the training process draws keys and collates in both")
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
            mask = timed("RLE decode + validate (rle_mask + check_mask)",
                         lambda s=seg, hw=hw: check_mask(rle_mask(s, *hw), src.spec.min_area))
            timed("  of which rle_counts (Python validation)", rle_counts, seg["counts"])
            timed("  of which pycocotools decode", lambda s=seg: mask_utils.decode(
                {"size": s["size"], "counts": s["counts"].encode("ascii")}).astype(bool))
            image = timed("JPEG decode (read_image)", read_image, f"{stem}.jpg", MAX_PIXELS, hw)
            timed(f"resize to {args.size} (square: image + mask + tensors)", square, image, mask, args.size, "squash")
            resized = timed("  of which image (_resize_image)", _resize_image, image, (args.size, args.size))
            timed("  of which mask (resize_mask)", resize_mask, mask, (args.size, args.size))
            timed(f"  of which HWC->CHW tensor (torch, {threads} threads)", to_chw, resized)
            torch.set_num_threads(1)
            timed("  (the same with torch at 1 thread, not in the sum)", to_chw, resized)
            torch.set_num_threads(threads)
            timed("Sa1bSource.load, end to end", src.load, (stem, ann_index), 0)
    parts = ("JSON parse (open + json.load)", "RLE decode + validate (rle_mask + check_mask)",
             "JPEG decode (read_image)", f"resize to {args.size} (square: image + mask + tensors)")
    print(f"   breakdown, one process (torch threads {threads}), mean over {len(keys)} samples after 3 warm-up "
          f"loads; others {share.other:.0%}")
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
    print(f"2. index memory: {total:,} annotations in {args.index_files:,} JSON files, {shards} shards of "
          f"{args.files_per_shard} files (written in {t_write:.1f} s)")

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
    print(f"   naive / index, all shards: {naive_traced / all_rows:.1f}x   naive / held by the stream: "
          f"{naive_traced / max(1, held_rows + held_starts):.0f}x")
    print(f"   time: build from JSON {t_build:.2f} s ({1e6 * t_build / n:.2f} us/annotation, "
          f"{1000 * t_build / args.index_files:.2f} ms/file, cache writes included); "
          f"read from cache {t_cache:.3f} s ({t_build / t_cache:.0f}x faster)")


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
    parser.add_argument("--only", choices=["throughput", "index"])
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check that the script works")
    args = parser.parse_args()
    # `square` makes its tensor from PIL's read-only array (then copies it): torch warns once; harmless here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if args.quick:
        args.images, args.image_size, args.masks, args.size, args.min_area = 6, "300x450", 8, 256, 16
        args.samples, args.batch_size, args.breakdown, args.rounds = 16, 4, 8, 1
        args.index_files, args.anns_per_file, args.files_per_shard = 300, 20, 100
    args.hw = tuple(int(v) for v in args.image_size.lower().split("x"))

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("numpy", "pillow", "pycocotools", "torch"))
    print(f"$ python {shlex.join(sys.argv)}")
    print(f"{datetime.date.today()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}, {versions}")
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
