"""`dualrl.eval.training.evaluate`: the `eval/*` metrics of a run, averaged over every region of every batch."""

from __future__ import annotations

import logging

import pytest

from dualrl.eval import training
from dualrl.eval.metrics import MeteorUnavailable, mean_meteor


def test_metrics_average_over_regions(canned):
    """Three regions: ref IoUs 1, 1/2, 0; cycle IoUs 1/4, 3/4, 1/2; one caption equal to its expression."""
    runtime, batches = canned
    metrics, examples = training.evaluate(runtime, batches, table_rows=1)
    assert metrics["eval/ref_miou"] == pytest.approx(0.5)
    assert metrics["eval/cycle_miou"] == pytest.approx(0.5)
    assert metrics["eval/cycle_soft_miou"] == pytest.approx(0.25)
    assert metrics["eval/caption_exact"] == pytest.approx(1 / 3)
    assert metrics["eval/caption_tokens"] == pytest.approx((3 + 3 + 2) / 3)
    assert metrics["eval/reward_total"] == pytest.approx(0.5)
    assert metrics["eval/reward/mask_iou"] == pytest.approx(0.5)
    assert "eval/reward/judge" not in metrics  # no score at all: not a 0
    captions = ["a red circle", "a blue square", "a star"]
    assert metrics["eval/meteor"] == pytest.approx(
        mean_meteor(captions, [["a red circle"], ["the square"], ["a green star"]])
    )
    assert len(examples) == 1 and examples[0]["pred"].all() and examples[0]["caption"] == "a red circle"


def test_meteor_is_left_out_with_one_warning_when_wordnet_is_missing(canned, monkeypatch, caplog):
    def unavailable(*_):
        raise MeteorUnavailable("WordNet is not installed")

    monkeypatch.setattr(training, "mean_meteor", unavailable)
    monkeypatch.setattr(training, "_meteor_warned", False)
    runtime, batches = canned
    with caplog.at_level(logging.WARNING, logger=training.log.name):
        first, _ = training.evaluate(runtime, batches)
        second, _ = training.evaluate(runtime, batches)
    assert "eval/meteor" not in first and "eval/meteor" not in second and "eval/cycle_miou" in first
    assert [r.getMessage() for r in caplog.records] == ["eval/meteor left out: WordNet is not installed"]


def test_every_logged_name_is_in_the_documented_table(canned, documented_names):
    metrics, _ = training.evaluate(*canned)
    names = {k.removeprefix("eval/") for k in metrics}
    assert all(k.startswith("eval/") for k in metrics)
    assert {("reward/<name>" if n.startswith("reward/") else n) for n in names} <= documented_names
