"""Frame pairs (SA-V): the region is described on frame t and segmented on frame t+k, in the dual loop and
in the reward worker; a batch without pairs is unchanged."""

from __future__ import annotations

import pytest
import torch

from dualrl.recipe import load_recipe
from dualrl.workers import RewardWorker
from tests.algo.test_objectives import _dual_only_step
from tests.conftest import TINY


def _paired(batch):
    """Frame t+k = frame t mirrored left-right, with its mask mirrored too."""
    return dict(batch, seg_images=batch["images"].flip(-1), seg_masks=batch["masks"].flip(-1))


def test_reward_worker_scores_against_the_later_frame(tiny_model, region_batch):
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=unused"])
    worker = RewardWorker(recipe.model, recipe.rewards, "cpu", model=tiny_model)
    with torch.no_grad():
        captions = tiny_model.describe(region_batch["images"], region_batch["masks"], max_new_tokens=5)
    paired = worker.segment(_paired(region_batch), captions.ids)
    later_only = worker.segment(
        {"images": region_batch["images"].flip(-1), "masks": region_batch["masks"].flip(-1)}, captions.ids
    )
    same = worker.segment(region_batch, captions.ids)
    torch.testing.assert_close(paired["mask_iou"], later_only["mask_iou"])
    assert not torch.equal(paired["logits"], same["logits"])
    worker.close()


def test_dual_loss_uses_the_later_frame(tiny_spec, region_batch, monkeypatch):
    from dualrl.model.build import build_model

    model = build_model(tiny_spec).train()
    seen = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda images, **kw: seen.append(images) or encode(images, **kw))
    torch.manual_seed(0)
    plain = _dual_only_step(model, region_batch)
    n_plain = len(seen)
    torch.manual_seed(0)
    paired = _dual_only_step(model, _paired(region_batch))
    assert len(seen) - n_plain == n_plain + 1  # one more encoding: the later frames
    assert torch.equal(seen[-1], region_batch["images"].flip(-1))
    assert plain.loss.item() != pytest.approx(paired.loss.item())
