"""The local runtime's teacher and learner hold their frozen image encoders once, and the update reuses the teacher's
encoding of the step's images: one encoding a step where there were two, and the same update."""

from __future__ import annotations

import pytest
import torch
from sam2.modeling.position_encoding import PositionEmbeddingSine

from dualrl.algo.rollout_data import Rollout, RolloutPlan, micro_batches
from dualrl.data.scenes import ShapesDataset, collate_regions
from dualrl.model import grounded_vlm
from dualrl.model import sam as samlib
from dualrl.model.build import build_model
from dualrl.model.grounded_vlm import Captions, LastEncoding, _tie
from dualrl.recipe import load_recipe
from dualrl.runtime.local import LocalRuntime
from dualrl.train import step_generator
from tests.conftest import TINY, metric_abs


def _runtime(*extra: str) -> LocalRuntime:
    return LocalRuntime(load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", *extra]))


def _count_encodings(monkeypatch) -> list[int]:
    """How many times any model runs SAM2's image encoder (the costly one of the two), as a list of 1s."""
    calls: list[int] = []
    encode_sam = grounded_vlm.GroundedVLM._encode_sam
    count = lambda model, images: calls.append(1) or encode_sam(model, images)  # noqa: E731
    monkeypatch.setattr(grounded_vlm.GroundedVLM, "_encode_sam", count)
    return calls


def _driver_step(runtime: LocalRuntime, batch: dict, step: int) -> dict:
    """Describe, score, learn and sync as the driver does in one process (sft_dual: one greedy caption a region)."""
    plan = RolloutPlan()
    torch.manual_seed(step)  # the update's LoRA dropout draws from torch's generator
    captions = runtime.rollout.describe(batch, plan, 7)
    scored = runtime.reward.score(batch, captions, plan.group_size)
    metrics = runtime.learner.step(batch, Rollout(captions, plan.group_size, scored.total), step_generator(0, step))
    runtime.sync()
    return metrics


@pytest.mark.parametrize("parts", [1, 2])
def test_the_update_reuses_the_teachers_encoding_and_learns_the_same(region_batch, monkeypatch, parts):
    """Two steps on two batches, the teacher synced in between: the update finds each step's own encoding, also
    when it runs in micro-batches (`optim.accumulation`), each of which takes its rows of it."""
    scenes = ShapesDataset("val", 8)
    batches = [region_batch, collate_regions([scenes[i] for i in range(4, 8)])]
    shared = _runtime(f"optim.accumulation={parts}")
    assert shared.reward.model.encodings is shared.learner.model.encodings
    apart = _runtime(f"optim.accumulation={parts}")
    apart.learner.model.encodings = LastEncoding()  # as before: the learner encodes the images itself
    calls = _count_encodings(monkeypatch)
    shared_metrics = [_driver_step(shared, batch, step) for step, batch in enumerate(batches, 1)]
    assert len(calls) == 2  # the teacher's, for its rewards; each update (each of its parts) found it
    apart_metrics = [_driver_step(apart, batch, step) for step, batch in enumerate(batches, 1)]
    assert len(calls) == 2 + 2 + 2 * parts  # the teacher's, and each part of each update its own
    # the same updates, to the last bits that CPU matrix kernels leave to where their inputs lie in memory (two
    # updates with encodings of their own differ as much: about 1e-9 in the projector's weights; shared against
    # apart, up to 7.5e-9 in text_hidden_fcs on a 2-core machine). The attention key
    # projections' biases are the exception: softmax ignores a shift common to a query's scores, so their exact
    # gradient is 0 and AdamW scales round-off up to as much as a learning rate a step; they are held to that.
    key_bias_atol = max(shared.learner.scheduler.get_last_lr()) * len(batches)
    apart_weights = dict(apart.learner.model.named_parameters())
    for name, p in shared.learner.model.named_parameters():
        atol = key_bias_atol if name.endswith("k_proj.bias") else 1e-7
        torch.testing.assert_close(p, apart_weights[name], rtol=1e-6, atol=atol, msg=name)
    for ours, theirs in zip(shared_metrics, apart_metrics, strict=True):
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-6, abs=metric_abs(key, 1e-8)), key
    shared.shutdown()
    apart.shutdown()


def test_frozen_encoder_weights_are_held_once_and_trainable_ones_are_not_shared():
    runtime = _runtime()
    teacher, student = runtime.reward.model, runtime.learner.model
    for mine, theirs in zip(teacher._encoders(), student._encoders()):
        assert all(a is b for a, b in zip(mine.parameters(), theirs.parameters()))
    assert teacher.text_hidden_fcs[0].weight is not student.text_hidden_fcs[0].weight  # the rest stays the teacher's
    runtime.shutdown()
    training = _runtime("model.trainable.sam_encoder=true")
    assert training.reward.model.encodings is not training.learner.model.encodings
    teacher_sam = training.reward.model.sam.image_encoder
    assert all(
        a is not b for a, b in zip(teacher_sam.parameters(), training.learner.model.sam.image_encoder.parameters())
    )
    training.shutdown()


def test_frozen_encoders_stay_in_eval_mode_in_training(tiny_spec):
    model = build_model(tiny_spec).train()
    assert model.sam.sam_mask_decoder.training and model.vlm.model.language_model.training
    assert not any(m.training for encoder in model._encoders() for m in encoder.modules())
    vision = tiny_spec.model_copy(update={"trainable": tiny_spec.trainable.model_copy(update={"vision": True})})
    open_model = build_model(vision).train()
    assert all(m.training for m in open_model.vlm.model.vision_tower.modules())
    assert not any(m.training for m in open_model.sam.image_encoder.modules())  # frozen still


def test_encoders_are_shared_only_between_models_of_one_architecture_and_size(tiny_spec):
    wider = tiny_spec.model_copy(update={"sam": tiny_spec.sam.model_copy(update={"image_size": 256})})
    with pytest.raises(ValueError, match=r"model\.sam differs"):
        build_model(wider).share_frozen_encoders(build_model(tiny_spec))


def test_weights_are_tied_only_between_modules_built_alike():
    with pytest.raises(ValueError, match="differs in shape"):
        _tie(torch.nn.Linear(2, 3), torch.nn.Linear(2, 4))
    with pytest.raises(ValueError, match="Conv1d"):
        _tie(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1)))
    with pytest.raises(ValueError, match="one model only"):
        _tie(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2))
    extra = torch.nn.Linear(2, 2)
    extra.register_buffer("scale", torch.ones(2))
    with pytest.raises(ValueError, match="holds"):
        _tie(torch.nn.Linear(2, 2), extra)
    half = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    first = half[0].weight
    with pytest.raises(ValueError, match="differs in shape"):
        _tie(half, torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 4)))
    assert half[0].weight is first  # nothing tied when any part does not fit
    mine, source = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert _tie(mine, source) == 6 * 4 and mine.weight is source.weight and mine.bias is source.bias


def test_rows_of_the_kept_images_get_those_rows_of_its_encoding_as_views():
    """A micro-batch's images (`images[lo:hi]`) find the whole batch's encoding; other tensors (a copy, another
    tensor, rows of a tensor that is not the kept one) and changed encoder weights do not."""
    images = torch.arange(6 * 2 * 3, dtype=torch.uint8).view(6, 2, 3)
    feats = grounded_vlm.ImageFeatures(
        torch.randn(6, 4, 5), samlib.SamFeatures(torch.randn(6, 3, 2, 2), [torch.randn(6, 1, 8, 8)])
    )
    cache = LastEncoding()
    cache.keep((images, (0, 0)), feats)
    assert cache.get((images, (0, 0))) == (images, feats, None)
    for lo, hi in ((0, 3), (3, 6), (2, 5), (5, 6)):
        kept, whole, rows = cache.get((images[lo:hi], (0, 0)))
        assert kept is images and whole is feats and rows == (lo, hi)
        part = whole.rows(*rows)
        assert torch.equal(part.vision, feats.vision[lo:hi]) and part.vision.data_ptr() == feats.vision[lo].data_ptr()
        assert torch.equal(part.sam.high_res[0], feats.sam.high_res[0][lo:hi])
    for other in (images.clone(), images[1:4].clone(), torch.zeros_like(images), images[:, :1], images[::2]):
        assert cache.get((other, (0, 0))) is None
    assert cache.get((images[1:3], (1, 0))) is None  # the encoders' weights moved since
    cache.keep((images[2:5], (0, 0)), feats.rows(2, 5))
    assert cache.get((images[0:2], (0, 0))) is None  # rows of the storage outside the kept tensor
    assert cache.get((images[3:5], (0, 0)))[2] == (1, 3)
    images[4, 0, 0] += 1  # an in-place write, through the base tensor: the kept encoding is stale
    assert cache.get((images[3:5], (0, 0))) is None and cache.get((images[2:5], (0, 0))) is None


def test_a_part_that_first_asks_for_sam2_features_gets_them_for_the_whole_kept_batch(tiny_model, region_batch):
    """The teacher captioned the batch (vision features only); the first micro-batch to segment runs SAM2's encoder
    once, on the whole kept batch, and gets its rows: those a fresh encoding of the batch gives."""
    images = region_batch["images"]
    calls = []
    encode_sam = tiny_model._encode_sam
    tiny_model._encode_sam = lambda pixels: calls.append(len(pixels)) or encode_sam(pixels)
    try:
        tiny_model.encodings.clear()
        with torch.no_grad():
            assert tiny_model.encode_images(images, sam=False).sam is None
            part = tiny_model.encode_images(images[1:3])
            assert calls == [len(images)]
            assert tiny_model.encode_images(images[3:4]).sam is not None and calls == [len(images)]
            tiny_model.encodings.clear()
            whole = tiny_model.encode_images(images)
    finally:
        del tiny_model._encode_sam
        tiny_model.encodings.clear()
    torch.testing.assert_close(part.vision, whole.vision[1:3])
    torch.testing.assert_close(part.sam.image_embed, whole.sam.image_embed[1:3])
    for ours, theirs in zip(part.sam.high_res, whole.sam.high_res, strict=True):
        torch.testing.assert_close(ours, theirs[1:3])


def test_one_micro_batch_is_the_batch_itself_with_a_rollout_of_its_own(region_batch):
    """The batch's tensors keep their identity, by which the encoding is found again; the objective may write on
    its Rollout (grpo's old log-probs) without touching the caller's."""
    rollout = Rollout(
        Captions(["a"] * 4, [torch.tensor([1])] * 4, [torch.zeros(1)] * 4, [True] * 4, [torch.tensor([2])] * 4)
    )
    ((batch, part),) = micro_batches(region_batch, rollout, 1)
    assert batch is region_batch and part is not rollout and part.captions.texts == rollout.captions.texts


def test_the_fpn_position_encodings_are_sam2s_values_as_a_view(tiny_model):
    encoder = tiny_model.sam.image_encoder
    assert type(encoder.neck.position_encoding) is samlib.BroadcastPositionEmbedding
    pixels = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        ours = encoder(pixels)
        official = PositionEmbeddingSine(encoder.neck.position_encoding.num_pos_feats * 2)
        for level, pos in zip(ours["backbone_fpn"], ours["vision_pos_enc"]):
            assert torch.equal(pos, official(level)) and pos.stride(0) == 0  # the same values, no copy per image
