"""Fixtures for the evaluation tests: the metric names docs/eval.md documents, and a runtime with canned answers."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "eval.md"


@pytest.fixture(scope="session")
def documented_names() -> set[str]:
    """The names in the first column of docs/eval.md's metric table (`reward/<name>` stays a pattern)."""
    text = DOC.read_text()
    table = text[text.index("## Metric names") :].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines()[2:]]
    return {name for cell in rows for name in re.findall(r"`([^`]+)`", cell)}


class CannedRuntime:
    """A learner and a reward worker that answer each batch with the IoUs, captions and rewards it carries."""

    def __init__(self):
        self.learner = SimpleNamespace(refer=lambda b: (b["ref_iou"], None), describe=self._describe)
        self.reward = SimpleNamespace(score=self._score)

    @staticmethod
    def _describe(batch):
        return SimpleNamespace(texts=batch["captions"], ids=[torch.ones(n) for n in batch["lengths"]])

    @staticmethod
    def _score(batch, captions):
        n = len(captions.texts)
        return SimpleNamespace(
            segmentation={
                "mask_iou": batch["cycle_iou"],
                "mask_soft_iou": batch["cycle_iou"] / 2,
                "logits": batch["logits"],
            },
            total=batch["cycle_iou"],
            scores={"mask_iou": batch["cycle_iou"].tolist(), "judge": [None] * n},
        )


def canned_batch(ref_iou, cycle_iou, captions, expressions) -> dict:
    n = len(captions)
    return {
        "images": torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
        "masks": torch.ones(n, 4, 4, dtype=torch.bool),
        "logits": torch.full((n, 2, 2), 1.0),
        "expression": expressions,
        "references": [[e] for e in expressions],
        "captions": captions,
        "lengths": [len(c.split()) for c in captions],
        "ref_iou": torch.tensor(ref_iou),
        "cycle_iou": torch.tensor(cycle_iou),
    }


@pytest.fixture
def canned():
    batches = [
        canned_batch([1.0, 0.5], [0.25, 0.75], ["a red circle", "a blue square"], ["a red circle", "the square"]),
        canned_batch([0.0], [0.5], ["a star"], ["a green star"]),
    ]
    return CannedRuntime(), batches
