"""Source orders, the weighted mixture, and the training stream: deterministic, resumable, lazy, and never
stopped by one bad sample."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from dualrl.data.decode import BadSample
from dualrl.data.loader import TrainBatches, _Receiver
from dualrl.data.sources.base import Shard, Source
from dualrl.data.stream import DataError, Mixture, SourceStream


class Toy(Source):
    """Shards of given sizes; sample (shard, row) is a 4x4 image whose value encodes it. Rows in `bad` raise."""

    def __init__(self, name, sizes, bad=(), reason="image_corrupt"):
        super().__init__(None, size=4)
        self.name, self.sizes, self.bad, self.reason = name, sizes, set(bad), reason
        self.built = []

    def shards(self):
        return [str(i) for i in range(len(self.sizes))]

    def build_shard(self, shard):
        self.built.append(shard)
        return Shard(np.arange(self.sizes[int(shard)])[:, None], skipped={"annotation_corrupt": 1})

    def key(self, index, shard, i):
        return int(shard), int(index.rows[i, 0])

    def load(self, key, seed):
        if key in self.bad or "all" in self.bad:
            raise BadSample(self.reason, f"row {key} is broken")
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask[0, 0] = True
        return {
            "image": torch.full((3, 4, 4), key[0] * 100 + key[1], dtype=torch.uint8),
            "mask": mask,
            "expression": None,
            "references": [],
            "source": self.name,
            "index": f"{key}",
        }


def _keys(stream, n):
    return [stream.key(c) for c in range(n)]


def test_epoch_covers_every_row_once_and_reshuffles():
    stream = SourceStream(Toy("t", [5, 0, 7, 3]), seed=1)
    assert stream.size() == 15
    first, second = _keys(stream, 30)[:15], _keys(stream, 30)[15:]
    assert sorted(first) == sorted(second) and len(set(first)) == 15
    assert first != second
    assert _keys(SourceStream(Toy("t", [5, 0, 7, 3]), seed=1), 30) == first + second  # deterministic
    assert _keys(SourceStream(Toy("t", [5, 0, 7, 3]), seed=2), 15) != first


def test_max_samples_is_a_fixed_subset_and_indexes_lazily():
    toy = Toy("t", [4] * 50)
    stream = SourceStream(toy, seed=0, max_samples=6)
    keys = _keys(stream, 18)
    assert stream.size() == 6 and len(toy.built) == 2  # 2 of 50 shards read
    assert set(keys[:6]) == set(keys[6:12]) == set(keys[12:]) and len(set(keys)) == 6
    assert stream.skipped == {"annotation_corrupt": 2}


def test_unshuffled_source_keeps_file_order():
    toy = Toy("t", [3, 2])
    toy.shuffle = False
    assert _keys(SourceStream(toy, seed=5), 6) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (0, 0)]


def test_empty_source_stops_with_its_name():
    with pytest.raises(DataError, match=r"t: no usable sample in 2 shard\(s\).*annotation_corrupt 2"):
        SourceStream(Toy("t", [0, 0]), seed=0).key(0)


def test_mixture_follows_weights_and_replays_counts():
    streams = [SourceStream(Toy(n, [100]), 0) for n in "abc"]
    mix = Mixture(streams, [1.0, 2.0, 5.0], seed=3)
    draws = []
    for d in mix.draws(0):
        draws.append(d)
        if len(draws) == 16000:
            break
    share = Counter(s for _, s, _ in draws)
    assert [round(share[i] / 16000, 2) for i in range(3)] == pytest.approx([0.125, 0.25, 0.625], abs=0.02)
    for p in (0, 1, 4095, 4096, 9000):  # resuming at p continues with the same (source, count) pairs
        assert next(iter(mix.draws(p))) == draws[p]
        assert next(iter(mix.draws(p)))[2] == sum(1 for _, s, _ in draws[:p] if s == draws[p][1])


def _batches(position=0, workers=0, bad=(), all_bad_after=64, chunk=1, receive_thread=False, pin=False):
    a, b = Toy("a", [20, 20], bad=bad), Toy("b", [30])
    streams = [SourceStream(a, 0), SourceStream(b, 0)]
    return TrainBatches(
        streams,
        Mixture(streams, [1, 1], 0),
        batch_size=4,
        position=position,
        seed=0,
        num_workers=workers,
        all_bad_after=all_bad_after,
        chunk=chunk,
        receive_thread=receive_thread,
        pin=pin,
    )


def _ids(batches, n):
    return [tuple(next(batches)["index"]) for _ in range(n)]


def test_resumed_stream_neither_replays_nor_skips():
    whole = _batches()
    ids = _ids(whole, 6)
    head = _batches()
    assert _ids(head, 3) == ids[:3]
    resumed = _batches(position=head.state()["data_position"])
    assert _ids(resumed, 3) == ids[3:]


def test_worker_processes_give_the_same_batches():
    ids = _ids(_batches(), 5)
    loader = _batches(workers=2)
    assert _ids(loader, 5) == ids
    loader.close()


def test_chunked_messages_give_the_same_batches_skips_and_positions():
    """Workers sending `data.chunk` draws a message: the same batches, skip counts and positions as one draw a
    message, and a run resumed mid-chunk (5 draws a chunk, 12 taken) continues where it stopped."""
    bad = {(0, i) for i in range(0, 20, 3)}
    plain = _batches(workers=2, bad=bad)
    ids = _ids(plain, 6)
    chunked = _batches(workers=2, bad=bad, chunk=5)
    try:
        assert _ids(chunked, 3) == ids[:3]
        assert chunked.metrics()["data/skipped_total"] > 0
        position = chunked.state()["data_position"]
        assert chunked._pending  # a chunk was part-way through: the resumed run starts inside it
        resumed = _batches(position=position, workers=2, bad=bad, chunk=5)
        assert _ids(resumed, 3) == ids[3:]
        resumed.close()
        assert _ids(chunked, 3) == ids[3:]
        assert chunked.state() == plain.state() and chunked.metrics() == plain.metrics()
    finally:
        plain.close()
        chunked.close()


def test_a_receiving_thread_gives_the_same_batches_skips_and_positions():
    """With `data.receive_thread` the workers' chunks are taken off the pipe ahead, in a thread: batches, skips and
    the checkpointed position are those of the plain loader at every step (counting stays with the consumer)."""
    bad = {(0, i) for i in range(0, 20, 3)} | {(1, i) for i in range(20)}  # the second shard: all bad
    plain = _batches(workers=2, bad=bad, chunk=3)
    threaded = _batches(workers=2, bad=bad, chunk=3, receive_thread=True)
    try:
        assert isinstance(threaded._it, _Receiver)
        for _ in range(6):
            assert tuple(next(plain)["index"]) == tuple(next(threaded)["index"])
            assert plain.state() == threaded.state()
        # load-time skips; index-time ones count the shards indexed so far, which depends on how far ahead draws go
        assert threaded.skips.counts == plain.skips.counts and sum(plain.skips.counts.values()) > 0
    finally:
        plain.close()
        threaded.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_batches_are_the_plain_ones():
    """For a GPU learner in the training process, images and masks are stacked into pinned memory, which `upload`
    copies without staging: the same batches, images and masks as the plain stream."""
    from dualrl.model.transfer import upload

    plain, pinned = _batches(workers=2), _batches(workers=2, pin=True)
    try:
        for _ in range(3):
            a, b = next(plain), next(pinned)
            assert b["images"].is_pinned() and b["masks"].is_pinned() and not a["images"].is_pinned()
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
            assert torch.equal(upload(b["masks"], "cuda").cpu(), a["masks"])
    finally:
        plain.close()
        pinned.close()


def test_the_receiving_thread_hands_on_the_loaders_error_and_end():
    """An error met while receiving (a worker that died, ...) is raised by the consumer's `next`, after the items
    received before it; the end of the items ends the iteration; a thread gone without either is an error."""

    def items(fail: bool):
        yield from range(3)
        if fail:
            raise RuntimeError("worker 1 exited unexpectedly")

    failing = _Receiver(items(fail=True), depth=2)
    assert [next(failing) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        next(failing)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # again, as a plain iterator would
        next(failing)
    assert list(_Receiver(items(fail=False), depth=1)) == [0, 1, 2]
    gone = _Receiver(iter(()), depth=1)
    gone._thread.join(timeout=5)
    gone._queue.get_nowait()  # its end-of-items message, taken away: as if the thread had died silently
    gone.POLL_S = 0.01
    with pytest.raises(RuntimeError, match="ended without"):
        next(gone)


def test_closing_or_dropping_a_threaded_loader_ends_its_workers_at_once():
    """`close()` stops the receiving thread and the loader's worker processes before it returns; a loader dropped
    without `close()` ends them when it is collected."""
    import gc
    import multiprocessing

    before = len(multiprocessing.active_children())
    for how in ("close", "drop"):
        batches = _batches(workers=2, chunk=2, receive_thread=True)
        next(batches)
        thread = batches._it._thread
        assert len(multiprocessing.active_children()) == before + 2
        if how == "close":
            batches.close()
        else:
            del batches
            gc.collect()
        assert not thread.is_alive(), how
        assert len(multiprocessing.active_children()) == before, how


def test_bad_samples_are_skipped_counted_and_logged_once(caplog):
    bad = {(0, i) for i in range(20)}  # every row of a's first shard
    with caplog.at_level(logging.WARNING, logger="dualrl.data"):
        batches = _batches(bad=bad)
        batch_list = [next(batches) for _ in range(10)]
    assert all(len(b["index"]) == 4 for b in batch_list)  # always full
    assert not any(i.startswith("(0, ") and b["source"][k] == "a" for b in batch_list for k, i in enumerate(b["index"]))
    metrics = batches.metrics()
    assert metrics["data/skipped/image_corrupt"] > 0
    assert metrics["data/skipped/annotation_corrupt"] == 3  # index-time, one per shard indexed
    assert metrics["data/skipped_total"] == metrics["data/skipped/image_corrupt"] + 3
    warnings = [r for r in caplog.records if "image_corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "row (0," in warnings[0].getMessage()
    resumed = _batches(bad=bad, position=batches.state()["data_position"])
    resumed.skips.counts.update(batches.state()["data_skipped"])
    assert resumed.metrics()["data/skipped/image_corrupt"] == metrics["data/skipped/image_corrupt"]


def test_a_source_with_only_bad_samples_stops_the_run():
    batches = _batches(bad={"all"}, all_bad_after=10)
    with pytest.raises(DataError, match=r"a: all 10 samples tried were bad \(image_corrupt 10\)"):
        for _ in range(20):
            next(batches)


def test_data_seed_moves_the_shapes_train_stream_not_its_held_out_splits():
    """Shapes scenes need no shuffling, so data.seed picks where the train stream starts: seed 0 draws scenes 0, 1, 2,
    ..., other seeds other scenes, and every seed evaluates on the same held-out scenes."""
    from dualrl.data.loader import EvalBatches, build_source
    from dualrl.recipe import load_recipe
    from tests.conftest import TINY

    def first_keys(seed: int, split: str = "train", n: int = 6) -> list[tuple]:
        data = load_recipe("recipes/sft_dual.yaml", [*TINY, f"data.seed={seed}", "output_dir=unused"]).data
        stream = SourceStream(build_source("shapes", data.shapes, data, 128, split=split), data.seed)
        return [stream.key(c) for c in range(n)]

    assert first_keys(0) == [(i,) for i in range(6)]
    seeds = [first_keys(s) for s in (0, 1, 2)]
    assert len({k for keys in seeds for k in keys}) == 18  # no scene shared by two seeds' first draws
    assert first_keys(0, "val") == first_keys(2, "val") == [(i,) for i in range(6)]
    images = []
    for seed in (0, 3):
        data = load_recipe("recipes/sft_dual.yaml", [*TINY, f"data.seed={seed}", "output_dir=unused"]).data
        images.append(next(iter(EvalBatches(data, 128, 4, "val")))["images"])
    assert torch.equal(images[0], images[1])


def test_referred_contrast_reaches_the_train_split_only():
    """data.shapes.contrast fades every split; referred_contrast sets the look of the train split's regions with
    text alone (held-out regions all carry text and stay at contrast); a contrast out of (0, 1] is refused."""
    from dualrl.data.loader import build_source
    from dualrl.recipe import RecipeError, load_recipe
    from tests.conftest import TINY

    shift = ["data.shapes.contrast=0.5", "data.shapes.referred_contrast=1.0", "output_dir=unused"]
    data = load_recipe("recipes/sft_dual.yaml", [*TINY, *shift]).data
    for split, want in (("train", (0.5, 1.0)), ("val", (0.5, None)), ("select", (0.5, None))):
        dataset = build_source("shapes", data.shapes, data, 128, split=split).dataset
        assert (dataset.contrast, dataset.referred_contrast) == want
    with pytest.raises(RecipeError, match="contrast"):
        load_recipe("recipes/sft_dual.yaml", [*TINY, "data.shapes.contrast=0", "output_dir=unused"])
