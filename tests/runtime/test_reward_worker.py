"""The reward worker: G captions of a region share one image encoding, and score the same as alone."""

from __future__ import annotations

import pytest
import torch

from dualrl.recipe import load_recipe
from dualrl.workers import RewardWorker
from tests.conftest import TINY


def test_group_of_captions_is_encoded_once_and_scored_like_single_ones(tiny_model, region_batch, monkeypatch):
    recipe = load_recipe(
        "recipes/sft_dual.yaml", [*TINY, "output_dir=unused", "rewards=[{name: mask_iou}, {name: length, weight: 0.5}]"]
    )
    worker = RewardWorker(recipe.model, recipe.rewards, "cpu", model=tiny_model)
    g = 3
    region = torch.arange(4).repeat_interleave(g)
    torch.manual_seed(0)
    captions = tiny_model.describe(
        region_batch["images"], region_batch["masks"][region], image_index=region, sample=True, max_new_tokens=6
    )
    calls = []
    encode = tiny_model.encode_images
    monkeypatch.setattr(tiny_model, "encode_images", lambda images: calls.append(1) or encode(images))
    tiny_model.encodings.clear()
    result = worker.score(region_batch, captions, group_size=g)
    assert len(calls) == 1 and len(result.total) == 12
    for i in range(12):  # each caption alone, its region as a batch of one
        r = i // g
        one = {k: v[r : r + 1] for k, v in region_batch.items() if k in ("images", "masks")}
        alone = worker.segment(one, [captions.ids[i]])
        assert alone["mask_iou"].item() == pytest.approx(result.scores["mask_iou"][i], abs=1e-5)
    expected = torch.tensor(result.scores["mask_iou"]) + 0.5 * torch.tensor(result.scores["length"])
    torch.testing.assert_close(result.total, expected.float())
    assert result.metrics["train/cycle_iou"] == torch.tensor(result.scores["mask_iou"]).mean().item()
    worker.close()
