"""The `meteor` reward: nltk's METEOR of each caption against its references (the best one counts).

METEOR needs WordNet; `rewards.wordnet.ensure_wordnet()` finds or builds it, and the plugin calls it at
construction so that a missing WordNet stops the run at start-up with instructions. nltk's METEOR is pure
Python (about 0.3 ms per region caption with 1-3 references), so `Meteor` scores batches in a pool of worker
processes.

Note on nltk's implementation: the WordNet stage sees the words left over from the stemming stage in their
*stemmed* form, so a synonym only matches when its Porter stem is the word itself ("car" ~ "auto" matches,
"car" ~ "automobile" does not, as "automobile" has become "automobil"). The scores are nltk's as they are.

This module is imported by the pool's worker processes: keep its imports light (no torch).
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import TYPE_CHECKING

from rewards.wordnet import ensure_wordnet

if TYPE_CHECKING:
    from rewards.base import RewardInput

# nltk's `word_tokenize` needs the punkt model (another nltk download, unavailable offline), so captions are
# tokenized by lowercasing and taking runs of letters, digits and underscores.
_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of `text`."""
    return _WORD.findall(text.lower())


def meteor_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float | None]:
    """nltk's METEOR (default alpha, beta, gamma) of each caption against all its references, the best one
    counting. `None` where a caption has no (non-blank) reference; 0.0 for an empty caption."""
    from nltk.translate.meteor_score import meteor_score

    ensure_wordnet()  # cheap after the first call in a process
    scores: list[float | None] = []
    for caption, refs in zip(captions, references, strict=True):
        ref_tokens = [tokens for tokens in map(tokenize, refs) if tokens]
        hypothesis = tokenize(caption)
        if not ref_tokens:
            scores.append(None)
        elif not hypothesis:
            scores.append(0.0)
        else:
            scores.append(float(meteor_score(ref_tokens, hypothesis)))
    return scores


def _init_worker(nltk_data_path: list[str]) -> None:
    """Pool worker start-up: the parent's nltk data folders, WordNet loaded, METEOR's lazy parts warmed."""
    import nltk

    nltk.data.path[:] = nltk_data_path
    ensure_wordnet()
    meteor_scores(["a red car on the left"], [["a red auto at left"]])


def _worker_ready() -> None:
    """A no-op task: submitting one per worker makes the pool start all its workers."""


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """Hide the parent's `__main__` module while worker processes start.

    "spawn" workers re-import the parent's main module (the training script, a Ray worker, ...) unless it
    looks like an interactive session; with a bare stand-in they import only nltk and this module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """A ready pool of `workers` spawned processes, each with WordNet loaded."""
    import nltk

    paths = [str(p) for p in nltk.data.path]
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(paths,))
    try:
        with _bare_main():  # spawn workers start on demand, one per submit while none is idle: start them all now
            ready = [pool.submit(_worker_ready) for _ in range(workers)]
        for future in ready:
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Meteor:
    """Reward plugin: METEOR of each caption against its references (`None` for captions without any).

    `workers` processes (0: in this process) score chunks of at most `chunk_size` captions, every worker getting
    a share; the pool is started on the first call that needs it and kept until `close()` or interpreter exit.
    Batches of fewer than `IN_PROCESS_BELOW` captions are scored in this process: on 2 idle cores the pool's
    round trip (about 1 ms) makes 2 workers break even at about 8 captions and win 1.6x at 16, 1.9x at 64
    (benchmarks/meteor_throughput.py has the large-batch figures)."""

    IN_PROCESS_BELOW = 16

    def __init__(self, workers: int = 2, chunk_size: int = 64) -> None:
        if workers < 0 or chunk_size < 1:
            raise ValueError(f"need workers >= 0 and chunk_size >= 1, got {workers=} {chunk_size=}")
        self.workers = workers
        self.chunk_size = chunk_size
        self.wordnet = ensure_wordnet()  # fail at start-up, with instructions, if WordNet is missing
        self._pool: ProcessPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None

    def __call__(self, batch: RewardInput) -> list[float | None]:
        return self.score(batch.captions, batch.references)

    def score(self, captions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float | None]:
        """METEOR per caption, in caption order."""
        if len(captions) != len(references):
            raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
        if self.workers == 0 or len(captions) < self.IN_PROCESS_BELOW:
            return meteor_scores(captions, references)
        size = min(self.chunk_size, -(-len(captions) // self.workers))  # every worker gets a share
        pool = self._get_pool()
        try:
            results = list(pool.map(meteor_scores, _chunks(captions, size), _chunks(references, size)))
        except BrokenProcessPool:
            self.close()  # a worker died: start a fresh pool next call
            raise
        return [score for chunk in results for score in chunk]

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = _start_pool(self.workers)
            # Shuts the pool down on close(), on garbage collection or at interpreter exit, whichever is first.
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=True, cancel_futures=True)
        return self._pool

    def close(self) -> None:
        """Shut the worker pool down (a later call starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None
