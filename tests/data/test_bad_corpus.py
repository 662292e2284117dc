"""The bad-data corpus (tests/data/bad_corpus.py) through the real training pipeline.

Per source, one full epoch is drawn through `TrainBatches` (batch size 1, loader worker processes for SA-V and
OpenImages) and accounted for exactly: every draw's case is known, so the skips by reason, the index-time
skips and the good samples must all come out as the corpus says, with no `load_error` (a crash caught as a
skip). Each case is also loaded on its own, so a wrong outcome names its case. A source whose every sample is
broken must stop the run with a `DataError` naming it.
"""

from __future__ import annotations

import logging
import re
import resource
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dualrl.data.decode import REASONS, BadSample
from dualrl.data.fixtures import coco_rle
from dualrl.data.loader import TrainBatches
from dualrl.data.sources.refcoco import RefCocoSource
from dualrl.data.sources.sa1b import Sa1bSource
from dualrl.data.sources.sav import SavSource
from dualrl.data.stream import DataError, Mixture, SourceStream
from dualrl.recipe import RefCocoSpec, Sa1bSpec, SavSpec
from tests.data.bad_corpus import (
    BUILDERS,
    GOOD_SENTENCE,
    OK,
    SIZE,
    Corpus,
    build_corpus,
    openimages_source,
    write_openimages,
)
from tests.data.make_refcoco import make_refcoco
from tests.data.make_sa1b import make_sa1b
from tests.data.make_sav import frame_of, object_mask, write_json, write_mp4

SOURCES = tuple(BUILDERS)
WORKERS = {"refcoco": 0, "sa1b": 0, "sav": 2, "openimages": 2}  # loader worker processes per source
LOAD_LOGGER, INDEX_LOGGER = "dualrl.data", "dualrl.data.sources.base"
LOAD_LOG = re.compile(r"^(\S+): skipping a sample \((\w+)\)")
INDEX_LOG = re.compile(r"^(\S+): skipping while indexing \((\w+)\)")
GREY = {"gray_jpeg", "png_16bit", "png_1bit", "png_gray_alpha", "tiff_float32", "gray_jpeg_1bit_mask"}
UNLOGGED: set[tuple[str, str]] = set()  # (source, reason) pairs counted without a log line: none
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Epoch:
    size: int  # keys in the epoch
    position: int  # draws consumed (>= size; the last batch may reach into the next epoch)
    drawn: Counter  # the outcome the corpus expects, over draws 0 .. position-1
    load_skips: dict[str, int]  # TrainBatches.reasons[source]
    logged_skips: dict[str, int]  # TrainBatches.skips.counts
    skipped: dict[str, int]  # TrainBatches.skipped(): load-time + index-time
    index_skips: dict[str, int]  # SourceStream.skipped
    samples: dict[str, list[dict]]  # good case -> the batches (of one) it gave
    unknown: list[str]  # sample indexes no good case claims
    per_case: dict[str, set[str]]  # case -> outcomes of loading each of its keys directly
    logs: list[tuple[str, str]]  # (logger, message) of every warning


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Corpus]:
    return build_corpus(tmp_path_factory.mktemp("bad_corpus"))


@pytest.fixture(scope="module")
def epochs() -> dict[str, Epoch]:
    return {}


def outcome(source, key: tuple, seed: int) -> str:
    try:
        source.load(key, seed)
    except BadSample as bad:
        return bad.reason
    return OK


def epoch(name: str, corpus: dict[str, Corpus], epochs: dict[str, Epoch], caplog) -> Epoch:
    """One epoch of a source through TrainBatches (once per module; later calls get the same result)."""
    if name in epochs:
        return epochs[name]
    c = corpus[name]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stream = SourceStream(c.source, seed=0)
        size = stream.size()  # builds every shard's index
        if c.after_index:
            c.after_index()
        batches = TrainBatches(
            [stream],
            Mixture([stream], [1.0], seed=0),
            batch_size=1,
            num_workers=WORKERS[name],
            prefetch=2,
            all_bad_after=10_000,
        )
        samples: dict[str, list[dict]] = {}
        unknown = []
        try:
            while batches.position < size:
                batch = next(batches)
                (index,) = batch["index"]
                if index in c.good_index:
                    samples.setdefault(c.good_index[index], []).append(batch)
                else:
                    unknown.append(index)
            drawn = Counter(c.expected[c.case_of(stream.key(p))] for p in range(batches.position))
            result = Epoch(
                size,
                batches.position,
                drawn,
                dict(batches.reasons[name]),
                dict(batches.skips.counts),
                batches.skipped(),
                dict(stream.skipped),
                samples,
                unknown,
                {},
                [],
            )
        finally:
            batches.close()
        for p in range(size):
            key = stream.key(p)
            result.per_case.setdefault(c.case_of(key), set()).add(outcome(c.source, key, p))
        result.logs = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    epochs[name] = result
    return result


# --------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", SOURCES)
def test_epoch_through_train_batches(name, corpus, epochs, caplog):
    c = corpus[name]
    e = epoch(name, corpus, epochs, caplog)
    assert e.position >= e.size > 0
    assert e.index_skips == c.index_expected
    load = {reason: n for reason, n in e.drawn.items() if reason != OK}
    assert e.load_skips == load and e.logged_skips == load
    assert "load_error" not in e.load_skips  # no crash was caught as a skip
    assert e.skipped == dict(Counter(load) + Counter(c.index_expected))
    assert e.unknown == []
    assert set(e.samples) == set(c.good)  # every good case loaded
    assert sum(len(v) for v in e.samples.values()) == e.drawn[OK]
    for case, batches in e.samples.items():
        for batch in batches:
            check_batch(name, case, batch)


def check_batch(name: str, case: str, batch: dict) -> None:
    images, masks = batch["images"], batch["masks"]
    assert images.shape == (1, 3, SIZE, SIZE) and images.dtype == torch.uint8, case
    assert masks.shape == (1, SIZE, SIZE) and masks.dtype == torch.bool, case
    assert masks.any() and not masks.all(), case
    assert batch["source"] == [name]
    if case in GREY:
        assert torch.equal(images[0, 0], images[0, 1]) and torch.equal(images[0, 1], images[0, 2]), case
    if name == "refcoco":
        expression, references = batch["expression"][0], batch["references"][0]
        assert expression in references and all(references), case
        if case == "one_bad_one_good_sentence":
            assert references == [GOOD_SENTENCE]  # the sentence that is not UTF-8 is dropped, the ref kept
    if name == "sav":
        index = batch["index"][0]
        first, second = {"npz_pair": (1, 5)}.get(index, (0, 4) if "+" in index else (4, None))
        assert frame_of(images[0]) == first, index
        assert ("seg_images" in batch) == (second is not None), index
        if second is not None:
            assert batch["seg_images"].shape == (1, 3, SIZE, SIZE) and batch["seg_images"].dtype == torch.uint8
            assert batch["seg_masks"].shape == (1, SIZE, SIZE) and batch["seg_masks"].dtype == torch.bool
            assert frame_of(batch["seg_images"][0]) == second and batch["seg_masks"].any(), index


@pytest.mark.parametrize("name", SOURCES)
def test_every_case_gives_its_outcome(name, corpus, epochs, caplog):
    """Each case, loaded key by key: exactly its expected reason (or a sample), and no case left undrawn."""
    c = corpus[name]
    e = epoch(name, corpus, epochs, caplog)
    assert e.per_case == {case: {reason} for case, reason in c.expected.items()}


# ------------------------------------------------------------------------------------------ logging
def _logged(logs: list[tuple[str, str]], logger: str, pattern: re.Pattern) -> Counter:
    return Counter(m.groups() for name, msg in logs if name == logger and (m := pattern.match(msg)))


@pytest.mark.parametrize("name", SOURCES)
def test_each_skip_reason_logged_once(name, corpus, epochs, caplog):
    c = corpus[name]
    e = epoch(name, corpus, epochs, caplog)
    load = _logged(e.logs, LOAD_LOGGER, LOAD_LOG)
    assert load == Counter({(name, reason): 1 for reason in e.load_skips})
    index = _logged(e.logs, INDEX_LOGGER, INDEX_LOG)
    assert index == Counter({(name, reason): 1 for reason in c.index_expected if (name, reason) not in UNLOGGED})


def test_sa1b_index_time_mask_too_small_is_logged(corpus, epochs, caplog):
    e = epoch("sa1b", corpus, epochs, caplog)
    assert _logged(e.logs, INDEX_LOGGER, INDEX_LOG)["sa1b", "mask_too_small"] == 1


# ------------------------------------------------------------------------------------------ summary
def test_summary(corpus, epochs, caplog):
    runs = {name: epoch(name, corpus, epochs, caplog) for name in corpus}
    kinds = set().union(*(c.reasons() for c in corpus.values()))
    broken = sum(len(c.broken) for c in corpus.values())
    good = sum(len(c.good) for c in corpus.values())
    crashes = sum(e.load_skips.get("load_error", 0) for e in runs.values())
    crashes += sum("load_error" in outcomes for e in runs.values() for outcomes in e.per_case.values())
    assert set(REASONS) - {"load_error"} <= kinds and "load_error" not in kinds
    assert len(corpus) >= 4 and crashes == 0
    print(
        f"\nbad-data corpus: {len(kinds)} kinds (distinct reasons), {broken} broken cases (+{good} good cases "
        f"that must load) across {len(corpus)} sources, {crashes} crashes"
    )


# --------------------------------------------------------------------------------- all sources mixed
def test_all_sources_mixed_through_workers(tmp_path):
    """The four corpora mixed in one TrainBatches with worker processes, until every source had an epoch:
    per source, the skips by reason and the good samples are exactly what its draws' cases say."""
    corpus = build_corpus(tmp_path)
    streams = [SourceStream(c.source, seed=1) for c in corpus.values()]
    sizes = [s.size() for s in streams]
    for c in corpus.values():
        if c.after_index:
            c.after_index()
    mixture = Mixture(streams, [1.0] * len(streams), seed=1)
    batches = TrainBatches(
        streams, mixture, batch_size=4, seed=1, num_workers=2, prefetch=2, all_bad_after=10_000, chunk=3
    )
    try:
        while any(n < size for n, size in zip(mixture.counts_at(batches.position), sizes)):
            batch = next(batches)
            assert batch["images"].shape == (4, 3, SIZE, SIZE) and batch["masks"].shape == (4, SIZE, SIZE)
    finally:
        batches.close()
    expected = {name: Counter() for name in corpus}
    for p, s, count in mixture.draws(0):
        if p >= batches.position:
            break
        c = list(corpus.values())[s]
        expected[c.name][c.expected[c.case_of(streams[s].key(count))]] += 1
    for stream, c in zip(streams, corpus.values()):
        assert batches.reasons[c.name] == {r: n for r, n in expected[c.name].items() if r != OK}, c.name
        assert batches.good[c.name] == expected[c.name][OK], c.name
        assert stream.skipped == c.index_expected, c.name
    assert "load_error" not in batches.skipped()


# ------------------------------------------------------------------------------------ all bad: stop
# Each returns (source, what to break once indexed or None, the DataError message). The check counts draws, and
# the epoch size is only known once the draws reach past it: a source of n samples may stop after n + 1.
def _sa1b_jpgs_deleted(root: Path):
    folder = make_sa1b(root / "sa", images=2)  # 4 masks over min_area

    def breaks():
        for jpg in folder.glob("*.jpg"):
            jpg.unlink()

    source = Sa1bSource(Sa1bSpec(root=str(folder), min_area=100), size=SIZE, cache_dir=None)
    return source, breaks, r"^sa1b \(.*: all \d+ samples tried were bad \(image_missing \d+\)"


def _openimages_masks_full(root: Path):
    cases = {f"full_{i}": ("rgb", "full", "full_mask") for i in range(3)}
    paths, _, _ = write_openimages(root / "oi", cases, {})
    return openimages_source(paths), None, r"^openimages \(.*: all \d+ samples tried were bad \(full_mask \d+\)"


def _refcoco_json_corrupt(root: Path):
    refer, images = make_refcoco(root)
    (refer / "refcoco" / "instances.json").write_text('{"images": [')
    source = RefCocoSource(RefCocoSpec(root=str(refer), images=str(images)), size=SIZE, cache_dir=None)
    return source, None, r"^refcoco \(.*no usable sample.*annotation_corrupt 1"


@pytest.mark.parametrize(
    ("build", "workers"),
    [(_sa1b_jpgs_deleted, 2), (_openimages_masks_full, 0), (_refcoco_json_corrupt, 0)],
    ids=["sa1b_every_jpg_deleted", "openimages_every_mask_full", "refcoco_instances_corrupt"],
)
def test_all_broken_source_stops_the_run(tmp_path, build, workers):
    source, breaks, message = build(tmp_path)
    stream = SourceStream(source, seed=0)
    if breaks:
        stream.size()
        breaks()
    batches = TrainBatches(
        [stream], Mixture([stream], [1.0], seed=0), batch_size=1, num_workers=workers, prefetch=2, all_bad_after=64
    )
    try:
        with pytest.raises(DataError, match=message):
            next(batches)
    finally:
        batches.close()


# ------------------------------------------------- loader gaps this corpus found (fixed; kept as tests)
def test_sav_index_counts_full_and_small_masks(tmp_path):
    write_mp4(tmp_path / "sav_000001.mp4", frames=12)
    full, small = np.ones((48, 64), bool), object_mask(2, 0)  # 4 px
    write_json(
        tmp_path / "sav_000001_manual.json",
        "sav_000001",
        [[coco_rle(full)], [coco_rle(small)], [coco_rle(object_mask(0, 2))]],
        frames=12,
    )
    shard = SavSource(SavSpec(root=str(tmp_path), min_area=20), SIZE).build_shard(".")
    assert len(shard) == 1
    assert shard.skipped == {"full_mask": 1, "mask_too_small": 1}


def _no_core_dump():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_absurd_polygon_coordinates_do_not_crash():
    code = (
        "from dualrl.data.decode import BadSample, polygon_mask\n"
        "try:\n"
        "    polygon_mask([[0.0, 0.0, 1e12, 0.0, 1e12, 1e12]], 48, 64)\n"
        "    print('ok')\n"
        "except BadSample as bad:\n"
        "    print(bad.reason)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_no_core_dump
    )
    assert run.returncode == 0 and run.stdout.strip() in ("bad_polygon", OK), (run.returncode, run.stderr[-500:])
