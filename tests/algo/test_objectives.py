"""The sft_dual objective: the soft-caption mask loss reaches both the segmenter and the captioner."""

from __future__ import annotations

import torch

from dualrl.algo.objectives import Pretrain, SftDual
from dualrl.model.build import build_model


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_dual_loss_flows_into_captioner_and_segmenter(tiny_spec, region_batch):
    """With only the dual term on (no supervised terms), gradients reach the SAM decoder, the [SEG]
    projection, and the LLM's LoRA through the soft caption tokens; the mask-only batch needs no text."""
    from dualrl.recipe import AlgoSpec

    model = build_model(tiny_spec).train()
    algo = AlgoSpec(sft_dual={"ref_weight": 0.0, "caption_weight": 0.0}, loss={"num_points": 128, "llm_weight": 0.0})
    objective = SftDual(algo, model.pad_id)
    batch = dict(region_batch, expression=[None] * 4, references=[[]] * 4)
    with torch.no_grad():
        rollout = model.describe(batch["images"], batch["masks"], max_new_tokens=5)
    out = objective(model, batch, rollout, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and "train/dual_iou" in out.metrics and "train/ref_iou" not in out.metrics
    grads = _grads(model, out.loss)
    has = lambda key: any(key in n and g.abs().sum() > 0 for n, g in grads.items())  # noqa: E731
    assert has("sam.sam_mask_decoder") and has("text_hidden_fcs")
    # The captioner: LoRA of the LLM gets gradient both through the segment prompt and the soft tokens.
    assert has("lora_B")


def test_soft_tokens_carry_gradient_to_caption_logits(tiny_spec, region_batch):
    """Detaching nothing, the caption-side LLM pass (region prompt) receives gradient from the mask loss:
    the lm_head / embedding path of the caption positions is non-zero only through the soft tokens."""
    from dualrl.recipe import AlgoSpec

    spec = tiny_spec.model_copy(deep=True)
    spec.trainable.lora = False
    spec.trainable.llm = True
    model = build_model(spec).train()
    algo = AlgoSpec(sft_dual={"ref_weight": 0.0, "caption_weight": 0.0}, loss={"num_points": 128, "llm_weight": 0.0})
    objective = SftDual(algo, model.pad_id)
    batch = dict(region_batch, expression=[None] * 4, references=[[]] * 4)
    with torch.no_grad():
        rollout = model.describe(batch["images"], batch["masks"], max_new_tokens=5)
    out = objective(model, batch, rollout, torch.Generator().manual_seed(0))
    grads = _grads(model, out.loss)
    lm_head = model.vlm.lm_head.weight
    # Tied embeddings: the table's gradient has a part from the soft-token logits (lm_head use).
    assert lm_head.grad is not None and lm_head.grad.abs().sum() > 0
    assert any("layers.0" in n for n in grads)


def test_pretrain_terms(tiny_spec, region_batch):
    """Pretraining reports mask, dice, LM and caption losses plus the click term when enabled."""
    from dualrl.recipe import AlgoSpec

    model = build_model(tiny_spec).train()
    algo = AlgoSpec(name="pretrain", pretrain={"point_weight": 1.0}, loss={"num_points": 128})
    out = Pretrain(algo)(model, region_batch, None, torch.Generator().manual_seed(0))
    for key in ("train/loss_mask", "train/loss_dice", "train/llm_loss", "train/caption_loss", "train/point_iou"):
        assert key in out.metrics
    assert torch.isfinite(out.loss)
    _grads(model, out.loss)
