"""Reward plugins: finding them from recipe entries, checking their options, running them together, and
the small built-ins (mask_iou, length, repetition, the example user plugin)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import torch

from dualrl.recipe import RewardSpec
from rewards.base import RewardInput
from rewards.registry import RewardConfigError, RewardSet, resolve_plugin

PLUGINS = """
import asyncio, time
from rewards.base import RewardOutput

def words(batch, per_word=1.0):
    return [per_word * len(c.split()) for c in batch.captions]

def only_first(batch):
    return [1.0] + [None] * (len(batch) - 1)

def broken(batch):
    raise ZeroDivisionError("plugin bug")

def slow(batch, seconds=1.0):
    time.sleep(seconds)
    return [1.0] * len(batch)

def short(batch):
    return [1.0]

def nan_second(batch):
    return [0.5, float("nan"), 0.5]

async def async_len(batch):
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in batch.captions]

class Counter:
    def __init__(self, start=0):
        self.calls = start
    def __call__(self, batch):
        self.calls += 1
        return RewardOutput([float(self.calls)] * len(batch), failures=1, metrics={"calls": self.calls})
"""


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGINS)
    return str(path)


def _batch(captions, refs=None, attributes=None) -> RewardInput:
    n = len(captions)
    columns = {"attributes": attributes} if attributes is not None else {}
    return RewardInput(
        captions=captions,
        caption_ids=[torch.zeros(1, dtype=torch.long)] * n,
        region=torch.arange(n),
        images=torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
        masks=torch.zeros(n, 4, 4, dtype=torch.bool),
        references=refs or [[] for _ in range(n)],
        columns=columns,
    )


def _spec(**kw) -> RewardSpec:
    return RewardSpec(**kw)


def test_resolve_builtin_module_attr_and_file(plugin_file):
    from rewards.shaping import length

    assert resolve_plugin(_spec(name="length")) is length
    assert resolve_plugin(_spec(name="rewards.shaping:repetition")).__name__ == "repetition"
    assert resolve_plugin(_spec(name="words", path=plugin_file, per_word=2.0)).__name__ == "words"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "bleu"}, "unknown reward 'bleu'; built-ins: ['length', 'llm_judge', 'mask_iou'"),
        ({"name": "length", "max_word": 3}, "unknown option(s) ['max_word']; allowed: ['min_words', 'max_words']"),
        ({"name": "llm_judge", "model": "judge"}, "required option(s) missing: ['base_url']"),
        ({"name": "words", "path": "nowhere.py"}, "path: file not found: 'nowhere.py'"),
        ({"name": "nothing_here", "path": "PLUGIN"}, "has no 'nothing_here'; callables there:"),
        ({"name": "no_such_module_xyz:f"}, "cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_entries_are_named(entry, message, plugin_file):
    if entry.get("path") == "PLUGIN":
        entry = dict(entry, path=plugin_file)
    with pytest.raises(RewardConfigError) as err:
        resolve_plugin(_spec(**entry))
    assert message in str(err.value)


def test_weighted_total_leaves_out_none(plugin_file):
    """total = sum of weight * score over the plugins that scored a caption; None is not 0."""
    rewards = RewardSet(
        [_spec(name="words", path=plugin_file, weight=0.5), _spec(name="only_first", path=plugin_file, weight=10.0)]
    )
    result = rewards(_batch(["a b", "a b c d", ""]))
    assert result.total.tolist() == [0.5 * 2 + 10.0, 0.5 * 4, 0.0]
    assert result.scores["only_first"] == [1.0, None, None]
    m = result.metrics
    assert m["reward/words"] == pytest.approx(2.0) and m["reward/only_first"] == 1.0
    assert m["reward/only_first/std"] == 0.0 and m["reward/total"] == pytest.approx((11 + 2 + 0) / 3)
    assert m["reward/unscored"] == 0.0 and m["reward/words/failures"] == 0.0


def test_failures_are_counted_logged_once_and_never_raise(plugin_file, caplog):
    """An exception, a timeout, a wrong-length answer and a NaN fail only that plugin's scores; the
    others still count; each kind is logged at WARNING the first time, then at DEBUG."""
    rewards = RewardSet(
        [
            _spec(name="words", path=plugin_file),
            _spec(name="broken", path=plugin_file),
            _spec(name="slow", path=plugin_file, timeout_s=0.2, seconds=2.0),
            _spec(name="short", path=plugin_file),
            _spec(name="nan_second", path=plugin_file),
        ]
    )
    batch = _batch(["a", "b c", "d e f"])
    with caplog.at_level(logging.DEBUG, logger="rewards.registry"):
        t0 = time.perf_counter()
        result = rewards(batch)
        elapsed = time.perf_counter() - t0
        rewards(batch)
    assert elapsed < 1.5  # the slow plugin's thread is abandoned at its timeout
    m = result.metrics
    assert result.scores["broken"] == [None] * 3 and m["reward/broken/failures"] == 3
    assert result.scores["slow"] == [None] * 3 and m["reward/slow/failures"] == 3
    assert m["reward/short/failures"] == 3
    assert result.scores["nan_second"] == [0.5, None, 0.5] and m["reward/nan_second/failures"] == 1
    assert result.total.tolist() == [1.5, 2.0, 3.5]
    assert rewards.failures == {"words": 0, "broken": 6, "slow": 6, "short": 6, "nan_second": 2}
    warned = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records if "broken" in r.getMessage()]
    assert [lvl for lvl, _ in warned] == [logging.WARNING, logging.DEBUG]
    assert any("timed out after 0.2 s" in r.getMessage() for r in caplog.records)
    assert any("returned 1 scores for 3 captions" in r.getMessage() for r in caplog.records)
    rewards.close()


def test_async_and_class_plugins(plugin_file):
    """Async functions run on the event loop; a class is built once with its options and keeps state;
    RewardOutput failures and metrics reach the logs."""
    rewards = RewardSet([_spec(name="async_len", path=plugin_file), _spec(name="Counter", path=plugin_file, start=5)])
    first, second = rewards(_batch(["ab", "abc"])), rewards(_batch(["ab", "abc"]))
    assert first.scores["async_len"] == [2.0, 3.0]
    assert first.scores["Counter"] == [6.0, 6.0] and second.scores["Counter"] == [7.0, 7.0]
    assert second.metrics["reward/Counter/calls"] == 7.0 and second.metrics["reward/Counter/failures"] == 1.0


def test_reward_set_runs_inside_a_worker_thread(plugin_file):
    """Ray actors and thread pools call the reward set from threads without an event loop of their own."""
    rewards = RewardSet([_spec(name="async_len", path=plugin_file)])

    async def main():
        return await asyncio.to_thread(rewards, _batch(["abcd"]))

    assert asyncio.run(main()).scores["async_len"] == [4.0]


def test_shaping_rewards():
    from rewards.shaping import length, repetition

    batch = _batch(["", "red", "the red circle", " ".join(["w"] * 24), " ".join(["w"] * 40)])
    assert length(batch, min_words=2, max_words=16) == [-1.0, -0.5, 0.0, -0.5, -1.0]
    batch = _batch(["the red the red circle", "a b c", ""])
    assert repetition(batch) == repetition(batch, n=2) == [-0.25, 0.0, 0.0]
    assert repetition(batch, n=1) == [-0.4, 0.0, 0.0]
    with pytest.raises(ValueError, match="min_words <= max_words"):
        length(batch, min_words=5, max_words=2)


def test_mask_iou_plugin_reads_the_reward_workers_segmentation():
    from rewards.mask_iou import MaskIoU

    batch = _batch(["a", "b"])
    with pytest.raises(RuntimeError, match="runs inside the RewardWorker"):
        MaskIoU()(batch)
    batch.segmentation = {"mask_iou": torch.tensor([0.5, 1.0]), "mask_soft_iou": torch.tensor([0.25, 0.75])}
    hard, soft = MaskIoU()(batch), MaskIoU(soft=True)(batch)
    assert hard.scores == [0.5, 1.0] and hard.metrics == {"soft": 0.5}
    assert soft.scores == [0.25, 0.75] and soft.metrics == {"hard": 0.75}


def test_example_user_plugin_from_its_path():
    """The documented example loads by path and reads a dataset column; regions without it are None."""
    spec = _spec(name="attribute_recall", path="rewards/examples/attribute_recall.py", keys=["colour", "shape"])
    rewards = RewardSet([spec])
    attrs = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}, None]
    result = rewards(_batch(["the red circle", "the red square", "anything"], attributes=attrs))
    assert result.scores["attribute_recall"] == [1.0, 0.5, None]
    assert result.metrics["reward/unscored"] == 1.0
