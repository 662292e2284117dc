"""Deterministic, resumable orders over sources and their weighted mixture.

A training run sees draw 0, 1, 2, ... of the mixture. Draw p picks a source with probability proportional
to its weight (a seeded choice, in blocks) and takes that source's next sample; the sample is a function of
(seed, p) alone. The checkpoint stores p, so a resumed run continues exactly where the saved one stopped,
neither replaying nor skipping data, however many loader workers had prefetched past it.

Within a source (`SourceStream`), count c maps to a shard and a row:
- shards are visited in a seeded order (file order when the source is already random);
- `max_samples` keeps the first samples of that order: whole shards, then a seeded subset of the last;
- an epoch is a pass over those samples; each epoch visits the shards in the same order and the rows of a
  shard in a fresh seeded order, so repeated data is reshuffled and the subset never changes.
Shard indexes are built when first reached; only their sizes are remembered, and the rows of the last few
shards used.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict

import numpy as np

from dualrl.data.sources.base import Shard, Source

log = logging.getLogger(__name__)

CHOICE_BLOCK = 4096  # mixture choices drawn per seeded block


class DataError(RuntimeError):
    """The data cannot feed the run (a source with no usable sample); the message names the source."""


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


class SourceStream:
    """Count c of one source -> the key of its sample."""

    def __init__(self, source: Source, seed: int, max_samples: int | None = None, keep_shards: int = 2):
        self.source, self.seed, self.max_samples = source, seed, max_samples
        names = source.shards()
        if not names:
            raise DataError(f"{source.describe()}: no shard found (no annotation files)")
        order = _rng(seed, 1).permutation(len(names)) if source.shuffle else range(len(names))
        self.names = [names[i] for i in order]
        self.starts = [0]  # starts[k] = first count of shard k in an epoch; grows as shards are indexed
        self.epoch_size: int | None = None
        self.skipped: dict[str, int] = {}
        self._cache: OrderedDict[int, Shard] = OrderedDict()
        self._keep = keep_shards
        self._perm: tuple[int, int, np.ndarray] | None = None

    # ------------------------------------------------------------------------------- the shards
    def _index(self, k: int) -> Shard:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        shard = self.source.shard_index(self.names[k])
        if k == len(self.starts) - 1:  # first time this shard is reached: its skips count once
            for reason, n in shard.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
        self._cache[k] = shard
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return shard

    def _used(self, k: int, shard: Shard) -> int:
        """Rows of shard k inside the max_samples limit."""
        if self.max_samples is None:
            return len(shard)
        return max(0, min(len(shard), self.max_samples - self.starts[k]))

    def _extend(self) -> bool:
        """Index the next shard; False when every shard is indexed (the epoch size is then known)."""
        k = len(self.starts) - 1
        if k >= len(self.names) or (self.max_samples is not None and self.starts[k] >= self.max_samples):
            self.epoch_size = self.starts[-1]
            return False
        self.starts.append(self.starts[k] + self._used(k, self._index(k)))
        if k + 1 == len(self.names) or (self.max_samples is not None and self.starts[-1] >= self.max_samples):
            self.epoch_size = self.starts[-1]  # known now, not one draw later
        return True

    def _locate(self, r: int) -> int:
        while self.starts[-1] <= r and self._extend():
            pass
        k = bisect.bisect_right(self.starts, r) - 1
        return k

    # ----------------------------------------------------------------------------------- lookup
    def size(self) -> int:
        """Samples in one epoch (indexes every shard inside the limit)."""
        while self.epoch_size is None:
            self._extend()
        return self.epoch_size

    def key(self, count: int) -> tuple:
        epoch, r = 0, count
        if self.epoch_size is None:
            self._locate(count)
        if self.epoch_size is not None:
            if self.epoch_size == 0:
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "no annotations"
                raise DataError(
                    f"{self.source.describe()}: no usable sample in {len(self.names)} shard(s) "
                    f"(skipped while indexing: {reasons})"
                )
            epoch, r = divmod(count, self.epoch_size)
        k = self._locate(r)
        shard = self._index(k)
        j = r - self.starts[k]
        return self.source.key(shard, self.names[k], self._row(k, epoch, shard, j))

    def _row(self, k: int, epoch: int, shard: Shard, j: int) -> int:
        if not self.source.shuffle:
            return j
        if self._perm is None or self._perm[:2] != (k, epoch):
            used = self.starts[k + 1] - self.starts[k]
            subset = _rng(self.seed, 2, k).permutation(len(shard))[:used].astype(np.uint32)  # 4 bytes a row
            self._perm = (k, epoch, subset[_rng(self.seed, 3, k, epoch).permutation(used)])
        return int(self._perm[2][j])


class Mixture:
    """Draw p -> (source, key). Sources are chosen by weight in seeded blocks; per-source counts are
    replayed from the choices, so the state of the whole mixture is the single number p."""

    def __init__(self, streams: list[SourceStream], weights: list[float], seed: int):
        if not streams:
            raise DataError("no data source is enabled (data.<source>.weight > 0)")
        w = np.asarray(weights, dtype=np.float64)
        self.streams, self.p, self.seed = streams, w / w.sum(), seed

    @property
    def names(self) -> list[str]:
        return [s.source.name for s in self.streams]

    def choices(self, block: int) -> np.ndarray:
        if len(self.streams) == 1:
            return np.zeros(CHOICE_BLOCK, dtype=np.int64)
        return _rng(self.seed, 4, block).choice(len(self.streams), CHOICE_BLOCK, p=self.p)

    def counts_at(self, position: int) -> np.ndarray:
        """How many draws each source had before draw `position`."""
        counts = np.zeros(len(self.streams), dtype=np.int64)
        full, rest = divmod(position, CHOICE_BLOCK)
        for b in range(full):
            counts += np.bincount(self.choices(b), minlength=len(self.streams))
        counts += np.bincount(self.choices(full)[:rest], minlength=len(self.streams))
        return counts

    def draws(self, position: int):
        """Yield (p, source index, source count) from draw `position` on, forever."""
        counts = self.counts_at(position)
        p = position
        while True:
            block = self.choices(p // CHOICE_BLOCK)
            for c in block[p % CHOICE_BLOCK :]:
                yield p, int(c), int(counts[c])
                counts[c] += 1
                p += 1
