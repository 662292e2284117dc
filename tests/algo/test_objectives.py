"""The sft_dual objective: the soft-caption mask loss reaches both the segmenter and the captioner."""

from __future__ import annotations

import pytest
import torch

from dualrl.algo.objectives import Pretrain, SftDual
from dualrl.model.build import build_model


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _dual_only_step(model, batch, **sft_dual):
    """One sft_dual step with only the soft-caption mask term on, on a mask-only batch."""
    from dualrl.recipe import AlgoSpec

    settings = {"ref_weight": 0.0, "caption_weight": 0.0, **sft_dual}
    algo = AlgoSpec(sft_dual=settings, loss={"num_points": 128, "llm_weight": 0.0})
    batch = dict(batch, expression=[None] * 4, references=[[]] * 4)
    with torch.no_grad():
        rollout = model.describe(batch["images"], batch["masks"], max_new_tokens=5)
    return SftDual(algo, model)(model, batch, rollout, torch.Generator().manual_seed(0))


@pytest.fixture
def caption_logits(monkeypatch) -> dict:
    """The student's next-token logits at the caption positions of the next sft_dual step (under "logits"), kept
    with their gradient."""
    import dualrl.algo.objectives as objectives

    seen: dict = {}
    original = objectives.topk_gumbel_softmax

    def spy(logits, *args, **kwargs):
        logits.retain_grad()
        seen["logits"] = logits
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(objectives, "topk_gumbel_softmax", spy)
    return seen


def test_dual_loss_flows_into_captioner_and_segmenter(tiny_spec, region_batch):
    """With only the dual term on (no supervised terms), gradients reach the SAM decoder, the [SEG]
    projection and the LLM's LoRA; the mask-only batch needs no text."""
    model = build_model(tiny_spec).train()
    out = _dual_only_step(model, region_batch)
    assert torch.isfinite(out.loss) and "train/dual_iou" in out.metrics and "train/ref_iou" not in out.metrics
    grads = _grads(model, out.loss)
    has = lambda key: any(key in n and g.abs().sum() > 0 for n, g in grads.items())  # noqa: E731
    assert has("sam.sam_mask_decoder") and has("text_hidden_fcs") and has("lora_B")


def test_frozen_dual_segmenter_trains_only_the_captioner(tiny_spec, region_batch, caption_logits):
    """algo.sft_dual.dual_segmenter=frozen: the soft captions are segmented by the student's weights held constant,
    so the dual term's gradient reaches the captioner (the caption logits, LoRA through them) and nothing that only
    segments (SAM2's decoder, the [SEG] projection); every weight is trainable again afterwards."""
    model = build_model(tiny_spec).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = _dual_only_step(model, region_batch, dual_segmenter="frozen")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    grads = _grads(model, out.loss)
    has = lambda key: any(key in n and g.abs().sum() > 0 for n, g in grads.items())  # noqa: E731
    assert has("lora_B") and caption_logits["logits"].grad.abs().sum() > 0
    assert not has("sam.sam_mask_decoder") and not has("text_hidden_fcs")
    student = _grads(model, _dual_only_step(model, region_batch).loss)  # the default: the segmenter learns too
    assert any("sam.sam_mask_decoder" in n and g.abs().sum() > 0 for n, g in student.items())


def test_mask_loss_reaches_caption_logits_through_soft_tokens(tiny_spec, region_batch, caption_logits):
    """The student's next-token logits at the caption positions (the captioner) receive gradient from the
    mask loss, through the straight-through Gumbel-softmax soft tokens."""
    model = build_model(tiny_spec).train()
    out = _dual_only_step(model, region_batch)
    out.loss.backward()
    grad = caption_logits["logits"].grad
    assert grad is not None and grad.abs().sum() > 0 and caption_logits["logits"].shape[0] > 0


def test_caption_term_learns_only_the_references(tiny_spec, region_batch):
    """sft_dual's captioning term is the referenced regions' expressions. The EMA captions the student reads (a
    share of their tokens dropped) are its input, not its targets, nor is the end token after them: the term is the
    same whatever the dropout, and zero on a batch without expressions. (The end token after a caption whose last
    token was dropped once carried a target, at a cross-entropy of 25 for the pretrained tiny model.)"""
    from dualrl.recipe import AlgoSpec

    model = build_model(tiny_spec).eval()  # no LoRA dropout: the two passes see the same weights
    with torch.no_grad():
        rollout = model.describe(region_batch["images"], region_batch["masks"], max_new_tokens=5)

    def caption_loss(batch: dict, dropout: float) -> torch.Tensor:
        algo = AlgoSpec(sft_dual={"caption_token_dropout": dropout}, loss={"num_points": 128})
        with torch.no_grad():
            out = SftDual(algo, model)(model, batch, rollout, torch.Generator().manual_seed(0))
        return out.metrics["train/caption_loss"]

    referenced = caption_loss(region_batch, 0.0)
    assert referenced > 0
    torch.testing.assert_close(caption_loss(region_batch, 0.9), referenced)
    unreferenced = dict(region_batch, expression=[None] * 4, references=[[]] * 4)
    assert caption_loss(unreferenced, 0.9) == 0


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


def test_clicks_on_every_region_train_the_segmenter_on_mask_only_regions(tiny_spec, region_batch):
    """algo.pretrain.point_regions=all: the click term covers the mask-only regions too, so a batch without any
    expression still trains SAM2's decoder (and only through the click term: nothing reaches the LLM's LoRA), where
    `referred` leaves it at zero; with expressions on half the regions the supervised terms are those of `referred`.
    In eval mode, so that LoRA dropout draws nothing between the two objectives' steps."""
    from dualrl.recipe import AlgoSpec, RecipeError

    model = build_model(tiny_spec).eval()

    def step(batch, regions):
        algo = AlgoSpec(
            name="pretrain", pretrain={"point_weight": 1.0, "point_regions": regions}, loss={"num_points": 128}
        )
        return Pretrain(algo)(model, batch, None, torch.Generator().manual_seed(0))

    unreferenced = dict(region_batch, expression=[None] * 4, references=[[]] * 4)
    assert float(step(unreferenced, "referred").loss) == 0
    out = step(unreferenced, "all")
    assert set(out.metrics) == {"train/point_iou"} and float(out.loss) > 0
    grads = _grads(model, out.loss)
    assert any("sam.sam_mask_decoder" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert not any("lora" in n and g.abs().sum() > 0 for n, g in grads.items())
    half = dict(region_batch)
    half["expression"] = [e if i % 2 else None for i, e in enumerate(region_batch["expression"])]
    half["references"] = [r if i % 2 else [] for i, r in enumerate(region_batch["references"])]
    referred, every = step(half, "referred"), step(half, "all")
    for key in ("train/loss_mask", "train/loss_dice", "train/llm_loss", "train/caption_loss", "train/ref_iou"):
        assert torch.allclose(referred.metrics[key], every.metrics[key], atol=1e-6), key
    assert not torch.allclose(referred.loss, every.loss)  # the click term covers twice the regions
    with pytest.raises((ValueError, RecipeError), match="point_weight > 0"):
        AlgoSpec(name="pretrain", pretrain={"point_regions": "all"})


def test_objectives_are_found_by_name_and_declare_what_a_step_needs():
    """One registry maps algo.name to its objective; the driver, runtimes and learner read its declarations."""
    from types import SimpleNamespace

    from dualrl.algo.registry import OBJECTIVES, objective_class, register
    from dualrl.recipe import AlgoSpec

    objective_class(AlgoSpec())  # the built-in objectives register on first lookup
    assert {"pretrain", "sft_dual", "grpo"} <= set(OBJECTIVES)
    expected = {"pretrain": (None, False), "sft_dual": ("ema", False), "grpo": ("policy", False)}
    for name, (weights, reference) in expected.items():
        cls = objective_class(AlgoSpec(name=name))
        assert cls.name == name and cls.rollout_weights == weights
        assert cls.needs_reference(AlgoSpec(name=name)) is reference
    assert objective_class(AlgoSpec(name="grpo", grpo={"beta": 0.04})).needs_reference(
        AlgoSpec(name="grpo", grpo={"beta": 0.04})
    )
    with pytest.raises(ValueError, match="no such objective"):
        objective_class(SimpleNamespace(name="nope"))
    with pytest.raises(ValueError, match="registered twice"):
        register("sft_dual")(type("Other", (), {}))


def test_frozen_dual_segmenter_is_refused_with_sharded_learners():
    from dualrl.recipe import load_recipe

    with pytest.raises(ValueError, match="dual_segmenter=frozen"):
        load_recipe(
            "recipes/sft_dual.yaml",
            [
                "algo.sft_dual.dual_segmenter=frozen",
                "runtime.kind=ray",
                "runtime.learners=2",
                "runtime.learner_sharding=fsdp",
            ],
        )


def test_stops_keep_the_prefix_the_segmenter_reads_best_by_the_margin(tiny_spec, region_batch, monkeypatch):
    """`SftDual.stops` segments every prefix of each caption (longest first) and keeps the whole caption unless a
    shorter prefix gains `stop_margin` of IoU over the one chosen so far; an empty caption is not tried."""
    import dualrl.algo.objectives as objectives
    from dualrl.recipe import AlgoSpec

    model = build_model(tiny_spec).eval()
    asked = []

    def segment(images, texts, feats=None, image_index=None):
        asked.extend((len(t.ids), int(r)) for t, r in zip(texts, image_index))
        return (torch.zeros(len(texts), 4, 4),)

    monkeypatch.setattr(model, "segment", segment)
    # IoUs of the prefixes, longest first: caption 0 (3 tokens), caption 2 (2 tokens), caption 3 (2 tokens)
    ious = torch.tensor([0.50, 0.51, 0.60, 0.70, 0.71, 0.20, 0.90])
    monkeypatch.setattr(objectives, "mask_iou", lambda logits, gt: ious)
    captions = [torch.tensor([5, 6, 7]), torch.tensor([], dtype=torch.long), torch.tensor([8, 9]), torch.tensor([3, 4])]
    objective = SftDual(AlgoSpec(sft_dual={"stop_margin": 0.02}), model)
    assert objective.stops(model, None, region_batch["masks"], captions) == [1, 0, 2, 1]
    assert asked == [(3, 0), (2, 0), (1, 0), (2, 2), (1, 2), (2, 3), (1, 3)]


def test_the_stop_term_learns_the_end_token_alone(tiny_spec, region_batch, monkeypatch):
    """With `stop_weight`, each region's cut caption is the input and only the end token after it a target: the
    captioning term is the references' as without it, the stop term is the cross-entropy of that end token, and
    alone (every other weight 0) it is the loss and its gradient reaches the captioner's LoRA."""
    from dualrl.recipe import AlgoSpec

    model = build_model(tiny_spec).eval()
    with torch.no_grad():
        rollout = model.describe(region_batch["images"], region_batch["masks"], max_new_tokens=5)
    keep = [max(1, len(c) - 1) for c in rollout.ids]
    monkeypatch.setattr(SftDual, "stops", lambda self, *args: keep)

    def step(stop_weight: float, loss: dict | None = None, **weights):
        algo = AlgoSpec(sft_dual={"stop_weight": stop_weight, **weights}, loss={"num_points": 128, **(loss or {})})
        return SftDual(algo, model)(model, region_batch, rollout, torch.Generator().manual_seed(0))

    plain, stopped = step(0.0), step(1.0)
    assert "train/stop_loss" not in plain.metrics
    torch.testing.assert_close(stopped.metrics["train/caption_loss"], plain.metrics["train/caption_loss"])
    # one target a region: the end token, right after its cut caption; the term is its cross-entropy
    from dualrl.model.sequence import Ids

    image_tokens = model.project(model.encode_images(region_batch["images"]))
    prompts = model.region_prompts(
        image_tokens, region_batch["masks"], torch.arange(4), [Ids(c[:k], stop=True) for c, k in zip(rollout.ids, keep)]
    )
    with torch.no_grad():
        seq = model.assemble(prompts)
        logits = model.logits_at(model.lm_hidden(seq))
    rows, cols = (seq.host_labels != -100).nonzero(as_tuple=True)
    eos = model.tokenizer.convert_tokens_to_ids(model.prompts.eos)
    assert rows.tolist() == [0, 1, 2, 3] and (seq.host_labels[rows, cols] == eos).all()
    assert [int(seq.host_ids[r, c - 1]) for r, c in zip(rows, cols)] == [
        int(c[k - 1]) for c, k in zip(rollout.ids, keep)
    ]
    expected = torch.nn.functional.cross_entropy(logits[rows, cols - 1].float(), torch.full((4,), eos))
    torch.testing.assert_close(stopped.metrics["train/stop_loss"], expected, rtol=1e-4, atol=1e-5)
    assert stopped.metrics["train/stop_tokens_cut"] == pytest.approx(
        sum(len(c) - k for c, k in zip(rollout.ids, keep)) / 4
    )
    alone = step(1.0, dual_weight=0.0, ref_weight=0.0, caption_weight=0.0, loss={"llm_weight": 0.0})
    torch.testing.assert_close(alone.loss, alone.metrics["train/stop_loss"])
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in _grads(model, alone.loss).items())
