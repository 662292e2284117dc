"""What a data source is: a list of shards, a lazily built and cached index per shard, and a loader.

The index lives in the training process and stays small: per shard, one integer row per usable sample
(e.g. SA-1B: file ordinal, annotation ordinal), plus the shard's file names. Building a shard's index
parses its annotation files once; the result is cached on disk (`data.cache_dir`) under a key made of the
source, its index options and the shard's path, size and modification time, so a later run reads a few
arrays instead. Shards are only indexed when the stream reaches them: a run limited to 10 k SA-1B masks
indexes the shards those masks come from, not 11 M images.

`key()` turns an index row into a small picklable key in the training process; `load()` turns a key into
a sample in a loader worker (decoding images, masks, videos) and raises `BadSample` when it cannot.
Problems found while indexing (a corrupt JSON, a CSV row with missing fields) are counted per reason in
the shard's `skipped` and reported like load-time skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualrl.data.decode import REASONS, BadSample
from dualrl.data.transforms import square

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass
class Shard:
    """A shard's index: `rows` [n, k] integers (one row per sample) or a count n (rows 0..n-1);
    `names`: strings the rows refer to (file names); `skipped`: index-time skips by reason."""

    rows: np.ndarray | int
    names: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.rows if isinstance(self.rows, int) else len(self.rows)

    def nbytes(self) -> int:
        rows = 0 if isinstance(self.rows, int) else self.rows.nbytes
        return rows + sum(len(n) for n in self.names)


def skip(skipped: dict[str, int], reason: str, detail: str, source: str, n: int = 1) -> None:
    """Count `n` index-time skips; the first of each reason is logged with its detail. `reason` is one of
    `REASONS`, the vocabulary load-time skips use."""
    if reason not in REASONS:
        raise ValueError(f"unknown skip reason {reason!r}; known: {REASONS}")
    if reason not in skipped:
        log.warning("%s: skipping while indexing (%s): %s", source, reason, detail)
    skipped[reason] = skipped.get(reason, 0) + n


class Source(ABC):
    """A dataset in its published layout. Subclasses set `name` and implement the four methods below."""

    name: str = ""
    shuffle: bool = True  # False for sources whose items are already in random order (shapes)
    full_masks: bool = False  # samples also carry the mask at the file's resolution (`full_mask`), for eval

    def __init__(
        self, spec, size: int, aspect: str = "squash", max_pixels: int = 1 << 28, cache_dir: str | None = None
    ):
        self.spec, self.size, self.aspect, self.max_pixels = spec, size, aspect, max_pixels
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    # --------------------------------------------------------------------------- training process
    @abstractmethod
    def shards(self) -> list[str]:
        """Stable list of shard names (relative paths or ids), cheap to compute."""

    @abstractmethod
    def build_shard(self, shard: str) -> Shard:
        """Parse one shard's annotations into its index (may take long; the result is cached)."""

    def index_options(self) -> dict[str, Any]:
        """Spec values the index depends on (filters), part of the cache key."""
        return {}

    def shard_stamp(self, shard: str) -> list:
        """What changes when the shard's files change (paths, sizes, modification times): part of the index
        cache key. Every source that caches its index says what that is."""
        raise NotImplementedError(f"{type(self).__name__} caches its index but defines no shard_stamp")

    @abstractmethod
    def key(self, index: Shard, shard: str, i: int) -> tuple:
        """The i-th sample of a shard as a picklable key for `load`."""

    def describe(self) -> str:
        return self.name

    def shard_index(self, shard: str) -> Shard:
        """`build_shard`, read from or written to the cache."""
        if self.cache_dir is None:
            return self.build_shard(shard)
        stamp = json.dumps(
            [INDEX_VERSION, self.name, self.index_options(), shard, self.shard_stamp(shard)],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha1(stamp.encode()).hexdigest()[:20]
        path = self.cache_dir / self.name / f"{digest}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    rows = z["rows"] if z["rows"].ndim else int(z["rows"])
                    meta = json.loads(str(z["meta"]))
                    return Shard(rows, [str(n) for n in z["names"]], meta["skipped"])
            except (OSError, ValueError, KeyError) as err:
                log.warning("%s: index cache %s unreadable (%s); rebuilding", self.name, path, err)
        built = self.build_shard(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            rows=np.asarray(built.rows),
            names=np.asarray(built.names, dtype=str),
            meta=json.dumps({"skipped": built.skipped, "stamp": stamp}),
        )
        os.replace(tmp, path)
        return built

    # ----------------------------------------------------------------------------- worker process
    @abstractmethod
    def load(self, key: tuple, seed: int) -> dict[str, Any]:
        """A key -> a sample (see `region`). Raises `BadSample`."""

    def region(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        index: str,
        expression: str | None = None,
        references: list[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The sample form every source returns: the region brought to the working square, plus text."""
        image_t, mask_t = square(image, mask, self.size, self.aspect)
        if self.full_masks:
            extra["full_mask"] = np.asarray(mask, dtype=bool)
        return {
            "image": image_t,
            "mask": mask_t,
            "expression": expression,
            "references": references or [],
            "source": self.name,
            "index": index,
            **extra,
        }

    def pair(self, sample: dict[str, Any], image: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """Add the frame to segment (`seg_image`, `seg_mask`) to a sample described on another frame."""
        sample["seg_image"], sample["seg_mask"] = square(image, mask, self.size, self.aspect)
        return sample


def require(path: str | Path, what: str, key: str) -> Path:
    """A path from the recipe that must exist, with the recipe key in the message when it does not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{key}: {what} not found at '{p}'")
    return p


__all__ = ["BadSample", "Shard", "Source", "require", "skip"]
