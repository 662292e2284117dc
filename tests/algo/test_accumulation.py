"""Gradient accumulation: a step's regions split into micro-batches with their own captions; one optimizer
step whose gradient is the mean of the micro-batches' gradients."""

from __future__ import annotations

import torch

from dualrl.algo.rollout_data import Rollout, micro_batches
from dualrl.model.grounded_vlm import Captions
from dualrl.recipe import load_recipe
from dualrl.workers.data_parallel import part_generator
from dualrl.workers.learner import Learner
from tests.conftest import TINY


def test_micro_batches_keep_regions_and_their_captions_together(region_batch):
    g = 2
    texts = [f"r{r}c{c}" for r in range(4) for c in range(g)]
    caps = Captions(
        texts, [torch.tensor([i]) for i in range(8)], [torch.zeros(1)] * 8, [True] * 8, [torch.tensor([99])] * 8
    )
    rollout = Rollout(caps, g, torch.arange(8.0))
    parts = micro_batches(region_batch, rollout, 3)
    assert [len(b["masks"]) for b, _ in parts] == [1, 2, 1]
    for (b, r), lo in zip(parts, (0, 1, 3)):
        assert r.captions.texts == [f"r{lo + i}c{c}" for i in range(len(b["masks"])) for c in range(g)]
        assert r.rewards.tolist() == [float(lo * g + i) for i in range(len(b["masks"]) * g)]
        assert b["expression"] == region_batch["expression"][lo : lo + len(b["masks"])]
        assert torch.equal(b["images"], region_batch["images"][lo : lo + len(b["masks"])])
    assert micro_batches(region_batch, None, 1)[0][0] is not None and len(micro_batches(region_batch, None, 9)) == 4


def test_accumulated_gradient_is_the_mean_of_the_parts(region_batch, monkeypatch):
    recipe = load_recipe(
        "recipes/sft_dual.yaml", [*TINY, "output_dir=x", "optim.accumulation=2", "model.trainable.lora_dropout=0.0"]
    )
    learner = Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu")
    with torch.no_grad():
        rollout = Rollout(learner.model.describe(region_batch["images"], region_batch["masks"], max_new_tokens=4))
    seen = {}
    monkeypatch.setattr(
        learner.optimizer,
        "step",
        lambda: seen.update({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}),
    )
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(1.0))
    learner.step(region_batch, rollout, torch.Generator().manual_seed(3))
    assert seen
    grads = []
    for k, (batch, part) in enumerate(micro_batches(region_batch, rollout, 2)):
        learner.model.zero_grad(set_to_none=True)
        generator = part_generator(torch.Generator().manual_seed(3), k)  # each micro-batch draws from its own
        learner.objective(learner.model, batch, part, generator).loss.backward()
        grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
    for name, grad in seen.items():
        torch.testing.assert_close(grad, (grads[0][name] + grads[1][name]) / 2, rtol=1e-4, atol=1e-6, msg=name)
