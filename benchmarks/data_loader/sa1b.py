"""SA-1B: loader throughput with where one sample's time goes (section 1), and the index's memory (section 2)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from dualrl.data.decode import check_mask, read_image, rle_counts, rle_mask
from dualrl.data.fixtures import (
    write_sa1b_record,
)
from dualrl.data.loader import TrainBatches
from dualrl.data.sources.sa1b import Sa1bSource
from dualrl.data.stream import Mixture, SourceStream
from dualrl.data.transforms import resize_image, resize_mask, square
from dualrl.recipe import Sa1bSpec

from .common import MAX_PIXELS, CpuShare, PeakRss, blob_annotation, picture, rss


def write_sa1b(root: Path, images: int, h: int, w: int, masks: int, seed: int = 0) -> dict[str, float]:
    """`images` sa_<n>.jpg + sa_<n>.json under root; returns mean file sizes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 3, (h + 64, w + 64)).round().astype(np.int16)
    pool = [blob_annotation(rng, h, w) for _ in range(max(4 * masks, 64))]
    jpg = js = counts = 0
    for n in range(images):
        image = picture(rng, h, w, grain)
        anns = [dict(pool[i], id=n * 1000 + j) for j, i in enumerate(rng.choice(len(pool), masks, replace=False))]
        write_sa1b_record(root, n, image, anns, quality=90)
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
            resized = timed("  of which image (resize_image)", resize_image, image, (args.size, args.size))
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
