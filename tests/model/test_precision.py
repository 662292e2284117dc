"""Real-scale switches on the tiny model: bf16 mixed precision, gradient checkpointing, attention kernels."""

from __future__ import annotations

import json

import torch

from dualrl.algo.objectives import SftDual
from dualrl.model.build import build_model
from dualrl.recipe import AlgoSpec, load_recipe
from tests.conftest import TINY


def _spec(*overrides):
    return load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", *overrides]).model


def test_bf16_stores_frozen_weights_in_bf16_and_trains_in_float32(tmp_path):
    model = build_model(_spec("model.precision=bf16"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    from dualrl.train import run

    summary = run(
        load_recipe(
            "recipes/sft_dual.yaml",
            [*TINY, f"output_dir={tmp_path}", "model.precision=bf16", "train.steps=2", "eval.every=2"],
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in lines if "train/loss" in m]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert 0.0 <= summary["final"]["eval/ref_miou"] <= 1.0


def _grads(spec, batch):
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator
    model = build_model(spec).train()
    with torch.no_grad():
        rollout = model.describe(batch["images"], batch["masks"], max_new_tokens=4)
    algo = AlgoSpec(loss={"num_points": 128}, sft_dual={"caption_token_dropout": 0.0})
    saved = []  # elements autograd keeps for the backward pass
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = SftDual(algo, model)(model, batch, rollout, torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, sum(saved)


def test_gradient_checkpointing_gives_the_same_gradients(region_batch):
    spec = _spec("model.trainable.lora_dropout=0.0")
    loss, grads, saved = _grads(spec, region_batch)
    loss_ckpt, grads_ckpt, saved_ckpt = _grads(spec.model_copy(update={"gradient_checkpointing": True}), region_batch)
    assert saved_ckpt < 0.9 * saved  # the LLM's activations are recomputed, not kept
    assert abs(loss - loss_ckpt) < 1e-5 and grads.keys() == grads_ckpt.keys() and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eager_and_sdpa_attention_agree(region_batch):
    outs = []
    for impl in ("sdpa", "eager"):
        model = build_model(_spec(f"model.attn_implementation={impl}")).eval()
        assert model.vlm.config.text_config._attn_implementation == impl
        with torch.no_grad():
            outs.append(model.segment(region_batch["images"], region_batch["expression"])[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_static_generation_cache_gives_the_same_captions(region_batch):
    captions = []
    for cache in ("dynamic", "static"):
        model = build_model(_spec("model.generation=generate", f"model.generation_cache={cache}")).eval()
        with torch.no_grad():
            greedy = model.describe(region_batch["images"], region_batch["masks"], max_new_tokens=6)
            torch.manual_seed(0)
            sampled = model.describe(region_batch["images"], region_batch["masks"], max_new_tokens=6, sample=True)
        captions.append((greedy, sampled))
    for a, b in zip(*captions):
        assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids]
        for x, y in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
