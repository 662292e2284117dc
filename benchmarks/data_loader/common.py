"""What every section of the data-loader benchmark shares: photo-like pictures and irregular blob masks to
write fixtures with, and the measuring tools (RSS, the CPU share of other processes, timed loads and loader
throughput).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import psutil
from PIL import Image
from pycocotools import mask as mask_utils

from dualrl.data.loader import TrainBatches
from dualrl.data.sources.base import Source
from dualrl.data.stream import Mixture, SourceStream

MAX_PIXELS = 64_000_000  # data.max_image_pixels' default


class Row(NamedTuple):
    """One line of section 3's table: a source built by `make`, timed over `samples` samples through the loader
    and `loads` loads in one process; `pairs`: its samples are frame pairs."""

    name: str
    kind: str
    make: Callable[[], Source]
    samples: int
    loads: int
    pairs: bool


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


def hw(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def no_grain(h: int, w: int) -> np.ndarray:
    return np.zeros((h + 64, w + 64), np.int16)


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
