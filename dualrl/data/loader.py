"""The data of a run: sources from the recipe, the training stream of batches, and the eval batches.

    recipe.data ─ sources (shapes, refcoco, sa1b, sav, openimages) ─ SourceStream each ─ Mixture
    training process: draw p -> (source, key)  ──►  loader workers: key -> decoded, squared sample
    training process: good samples -> batches; bad ones counted by reason, first of each logged

Decoding happens in `data.num_workers` processes with `data.prefetch` samples in flight per worker (rounded up to
whole chunks), sent `data.chunk` samples a message (the training process pays for each message it receives). A
bad sample never stops the run: it is skipped and the next draw taken, so every batch is full. A source
whose first `data.all_bad_after` draws (or whole epoch, if smaller) are all bad stops the run with a
message naming the source and the reasons: then it is the data's path or format, not a bad sample.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dualrl.data.batch import TENSORS, collate_regions
from dualrl.data.decode import BadSample
from dualrl.data.sources.base import Source
from dualrl.data.stream import DataError, Mixture, SourceStream

if TYPE_CHECKING:
    from dualrl.recipe import DataSpec, SourceSpec

log = logging.getLogger("dualrl.data")

REAL_SOURCES = ("refcoco", "sa1b", "sav", "openimages")
SOURCE_NAMES = ("shapes", *REAL_SOURCES)


def source_class(name: str) -> type[Source]:
    if name == "shapes":
        from dualrl.data.sources.shapes import ShapesSource as cls
    elif name == "refcoco":
        from dualrl.data.sources.refcoco import RefCocoSource as cls
    elif name == "sa1b":
        from dualrl.data.sources.sa1b import Sa1bSource as cls
    elif name == "sav":
        from dualrl.data.sources.sav import SavSource as cls
    elif name == "openimages":
        from dualrl.data.sources.openimages import OpenImagesSource as cls
    else:
        raise ValueError(f"unknown data source {name!r}; known: {SOURCE_NAMES}")
    return cls


def enabled(data) -> list[tuple[str, Any]]:
    """(name, spec) of the sources a training run mixes: configured, weight > 0."""
    return [(n, getattr(data, n)) for n in SOURCE_NAMES if getattr(data, n) is not None and getattr(data, n).weight > 0]


def working_size(data: DataSpec, sam_size: int) -> int:
    """The square every region is brought to: `data.image_size`, else SAM2's input size (`sam_size`); a shapes-only
    run keeps the shapes' own size."""
    if data.image_size:
        return data.image_size
    names = [n for n, _ in enabled(data)]
    if names == ["shapes"] or (not names and data.shapes is not None):
        return data.shapes.image_size
    return sam_size


def build_source(name: str, spec: SourceSpec, data: DataSpec, sam_size: int, split: str = "train") -> Source:
    """Source `name` with its section `spec`, bringing samples to the run's working size (`working_size`)."""
    kw = {
        "size": working_size(data, sam_size),
        "aspect": data.aspect,
        "max_pixels": data.max_image_pixels,
        "cache_dir": data.cache_dir,
    }
    if name == "shapes":  # its train stream starts where data.seed says (its scenes need no shuffling)
        fraction = data.expression_fraction if split == "train" else 1.0
        return source_class(name)(spec, split=split, expression_fraction=fraction, order_seed=data.seed or 0, **kw)
    return source_class(name)(spec, split=split, **kw)


# ----------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str
    detail: str


class _Load(Dataset):
    """Runs in the loader workers: a chunk of drawn keys -> [(draw, sample or Skipped)], one message."""

    def __init__(self, sources: dict[str, Source]):
        self.sources = sources

    def __getitem__(self, chunk: list[tuple]) -> list[tuple[int, Any]]:
        return [self._one(item) for item in chunk]

    def _one(self, item: tuple) -> tuple[int, Any]:
        p, name, key, seed = item
        try:
            return p, _as_arrays(self.sources[name].load(key, seed))
        except BadSample as bad:
            return p, Skipped(name, bad.reason, bad.detail)
        except Exception as err:  # a loader bug or a failure nobody foresaw: one sample, not the run
            return p, Skipped(name, "load_error", f"key {key}: {err!r}\n{traceback.format_exc()}")

    def __len__(self) -> int:  # not used: the sampler decides
        raise TypeError("drawn by key")


def _as_arrays(sample: dict[str, Any]) -> dict[str, Any]:
    """Images and masks as numpy arrays for the trip from a worker: an array is pickled into the pipe, while a
    torch tensor goes through a shared-memory file of its own, which costs the receiving training process 2.2x
    the CPU time (benchmarks/loader_transport.py, 2 cores: 31.5 against 14.3 ms a batch of 64 at 256^2)."""
    return {k: v.numpy() if k in TENSORS and isinstance(v, torch.Tensor) else v for k, v in sample.items()}


class _Draws(Sampler):
    """Runs in the training process: draws p -> chunks of `chunk` consecutive (p, source, key, seed), from
    `position` on."""

    def __init__(self, mixture: Mixture, streams: list[SourceStream], position: int, seed: int, chunk: int = 1):
        self.mixture, self.streams, self.position, self.seed, self.chunk = mixture, streams, position, seed, chunk

    def __iter__(self) -> Iterator[list[tuple]]:
        chunk = []
        for p, s, count in self.mixture.draws(self.position):
            stream = self.streams[s]
            chunk.append((p, stream.source.name, stream.key(count), self.seed * 1_000_003 + p))
            if len(chunk) == self.chunk:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class SkipLog:
    """Skips by reason and source: counted, the first of each (source, reason) logged with its detail."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: dict[str, int] = dict(counts or {})
        self.seen: set[tuple[str, str]] = set()

    def add(self, skip: Skipped) -> None:
        self.counts[skip.reason] = self.counts.get(skip.reason, 0) + 1
        if (skip.source, skip.reason) not in self.seen:
            self.seen.add((skip.source, skip.reason))
            log.warning(
                "%s: skipping a sample (%s): %s (further ones are counted in data/skipped/%s)",
                skip.source,
                skip.reason,
                skip.detail,
                skip.reason,
            )


class TrainBatches:
    """Full batches of good samples from draw `position` on. `position` and `skipped` go into checkpoints."""

    def __init__(
        self,
        streams: list[SourceStream],
        mixture: Mixture,
        batch_size: int,
        position: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        prefetch: int = 4,
        all_bad_after: int = 64,
        skipped: dict[str, int] | None = None,
        samples: dict[str, int] | None = None,
        chunk: int = 1,
        receive_thread: bool = False,
        pin: bool = False,
    ):
        self.streams, self.batch_size, self.position, self.pin = streams, batch_size, position, pin
        self.all_bad_after = all_bad_after
        self.skips = SkipLog(skipped)
        self.tried = {s.source.name: 0 for s in streams}
        self.good = {name: int((samples or {}).get(name, 0)) for name in self.tried}
        self.reasons: dict[str, dict[str, int]] = {n: {} for n in self.tried}
        loader = DataLoader(
            _Load({s.source.name: s.source for s in streams}),
            batch_size=None,
            sampler=_Draws(mixture, streams, position, seed, chunk if num_workers else 1),  # in-process: no messages
            num_workers=num_workers,
            prefetch_factor=-(-prefetch // chunk) if num_workers else None,  # chunks in flight per worker
            collate_fn=_identity,
            persistent_workers=False,
            generator=torch.Generator(),
        )
        # ^ its own generator: starting the iterator must not draw from the global RNG, which a resumed run
        # restores and must find exactly as the uninterrupted run had it.
        self._loader = loader
        self._it = iter(loader)
        if num_workers and receive_thread:  # counting, skipping and collating stay here, in draw order
            self._it = _Receiver(self._it, depth=max(2, -(-2 * batch_size // chunk)))  # two batches ahead
            weakref.finalize(self, self._it.close)  # dropped unclosed: the thread and the workers end all the same
        self._pending: deque[tuple[int, Any]] = deque()  # the rest of the last chunk received

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        items = []
        while len(items) < self.batch_size:
            if not self._pending:
                self._pending.extend(next(self._it))
            p, out = self._pending.popleft()
            self.position = p + 1
            if isinstance(out, Skipped):
                self.skips.add(out)
                self._count(out.source, out.reason)
                continue
            self.tried[out["source"]] += 1
            self.good[out["source"]] += 1
            items.append(out)
        return collate_regions(items, self.pin)

    def _count(self, name: str, reason: str) -> None:
        self.tried[name] += 1
        self.reasons[name][reason] = self.reasons[name].get(reason, 0) + 1
        stream = next(s for s in self.streams if s.source.name == name)
        limit = min(self.all_bad_after, stream.epoch_size or self.all_bad_after)
        if self.good[name] == 0 and self.tried[name] >= limit:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons[name].items(), key=lambda x: -x[1]))
            raise DataError(
                f"{stream.source.describe()}: all {self.tried[name]} samples tried were bad "
                f"({reasons}); check its paths and format (the first of each reason is logged above)"
            )

    def skipped(self) -> dict[str, int]:
        """Load-time skips of this run (and the runs it resumed) plus index-time skips of shards read."""
        total = dict(self.skips.counts)
        for stream in self.streams:
            for reason, n in dict(stream.skipped).items():  # a copy: the receiving thread's draws may index a shard
                total[reason] = total.get(reason, 0) + n
        return total

    def metrics(self) -> dict[str, float]:
        skipped = self.skipped()
        out = {f"data/skipped/{reason}": float(n) for reason, n in sorted(skipped.items())}
        out["data/skipped_total"] = float(sum(skipped.values()))
        out["data/position"] = float(self.position)
        out.update({f"data/samples/{name}": float(n) for name, n in self.good.items()})
        return out

    def state(self) -> dict[str, Any]:
        return {
            "data_position": self.position,
            "data_skipped": dict(self.skips.counts),
            "data_samples": dict(self.good),
        }

    def close(self) -> None:
        if isinstance(self._it, _Receiver):
            self._it.close()
        self._it = None
        self._loader = None


class _Receiver:
    """Takes the loader workers' messages off the pipe in a thread of the training process, up to `depth` ahead,
    and hands them over in order. Receiving (unpickling) costs the training process milliseconds a batch; in a
    thread it runs while the training thread waits for the GPU (those waits let other threads run). An error of
    the loader (a worker that died, ...) is raised by `next` in the training thread, after what came before it."""

    POLL_S = 1.0  # how often a waiting `next` checks that the thread still runs
    CLOSE_S = 10.0  # how long `close` waits for the thread to let go of the loader

    def __init__(self, items: Iterator, depth: int):
        self._items: Iterator | None = items  # the loader's iterator: its workers end when it is released
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._final: BaseException | None = None  # the end or the error, once handed over
        self._thread = threading.Thread(target=self._run, daemon=True, name="dualrl-receiver")
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, None)):
                    return
            self._put((None, StopIteration()))
        except BaseException as err:  # handed to the training thread, which raises it
            self._put((None, err))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=self.POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Receiver:
        return self

    def __next__(self):
        if self._final is not None:  # the end (or error) again, as a plain iterator would
            raise self._final
        while True:  # as long as the loader takes (its own deadlines hold there), never past the thread's end
            try:
                item, err = self._queue.get(timeout=self.POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data receiving thread ended without a sample or an error") from None
        if err is not None:
            self._final = err
            raise err
        return item

    def close(self) -> None:
        """Stop the thread and release the loader's iterator, whose workers then end (here, not later)."""
        self._stop.set()
        while True:  # a thread blocked on a full queue wakes at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.CLOSE_S)
        if self._thread.is_alive():
            log.warning("the data receiving thread did not stop in %.0f s; it ends with the process", self.CLOSE_S)
            return
        self._items = None


def _identity(x):
    return x


def train_batches(
    data: DataSpec, sam_size: int, position: int = 0, state: dict | None = None, pin: bool = False
) -> TrainBatches:
    """The training stream from draw `position`; `state` is a checkpoint's run state (skip and sample counts).
    `sam_size`: SAM2's input size, the working size unless `data` sets one. `pin`: batches' images and masks in pinned
    host memory, for a GPU learner in this process."""
    state = state or {}
    streams, weights = [], []
    for name, spec in enabled(data):
        streams.append(SourceStream(build_source(name, spec, data, sam_size), data.seed, spec.max_samples))
        weights.append(spec.weight)
    mixture = Mixture(streams, weights, data.seed)
    return TrainBatches(
        streams,
        mixture,
        data.batch_size,
        position,
        data.seed,
        data.num_workers,
        data.prefetch,
        data.all_bad_after,
        state.get("data_skipped"),
        state.get("data_samples"),
        data.chunk,
        data.receive_thread,
        pin,
    )


# -------------------------------------------------------------------------------------------- eval
def eval_source_name(data) -> str:
    if data.eval_source != "auto":
        return data.eval_source
    return "refcoco" if data.refcoco is not None else "shapes"


def in_file_order(
    source: Source, skips: SkipLog, limit: int | None = None, seed: int = 0, full_masks: bool = False
) -> Iterator[dict[str, Any]]:
    """Up to `limit` good samples of a source in file order (never shuffled), the same ones every time; bad
    ones are skipped into `skips`. Sample i loads with seed i (e.g. which RefCOCO sentence is the expression).
    `full_masks`: samples also carry their mask at the file's resolution (`full_mask`)."""
    source.shuffle = False
    source.full_masks = full_masks
    stream = SourceStream(source, seed)
    good = 0
    for i in range(stream.size()):
        if limit is not None and good >= limit:
            return
        try:
            sample = source.load(stream.key(i), i)
        except BadSample as bad:
            skips.add(Skipped(source.name, bad.reason, bad.detail))
            continue
        good += 1
        yield sample


class EvalBatches:
    """The held-out regions, the same ones at every eval: the first `size` good samples of the eval
    source's `split` (`val`, or shapes' `select`) in file order, bad ones skipped and counted."""

    def __init__(self, data: DataSpec, sam_size: int, batch_size: int, split: str = "val"):
        name = eval_source_name(data)
        spec = getattr(data, name)
        if spec is None:
            if name != "shapes":
                raise DataError(f"data.eval_source={name} but data.{name} is not configured")
            from dualrl.recipe import ShapesSpec

            spec = ShapesSpec()
        if split != "val" and name != "shapes":
            raise DataError(
                f"eval.split={split} exists for the shapes source only; for {name}, point a second run's "
                f"data.{name} at held-out files of its own to choose settings on"
            )
        self.source = build_source(name, spec, data, sam_size, split=split)
        self.size = data.eval_size if name != "shapes" else spec.val_size if split == "val" else spec.select_size
        self.batch_size = batch_size
        self.skips = SkipLog()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items, good = [], 0
        for sample in in_file_order(self.source, self.skips, self.size):
            items.append(sample)
            good += 1
            if len(items) == self.batch_size:
                yield collate_regions(items)
                items = []
        if items:
            yield collate_regions(items)
        if good == 0:
            raise DataError(f"{self.source.describe()}: no usable eval sample")
