"""GroundedVLM at tiny scale: both directions, feature reuse, the region prompt and the trainable set."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dualrl.model import grounded_vlm
from dualrl.model.build import build_model, load_weights, save_pretrained
from dualrl.model.grounded_vlm import GroundedVLM
from dualrl.model.sequence import Ids


def test_segment_shapes_and_feature_reuse(tiny_model, region_batch):
    """segment gives one low-res mask per text; passing precomputed features changes nothing, and several
    texts can share one image's features through image_index."""
    m = tiny_model
    with torch.no_grad():
        direct, *_ = m.segment(region_batch["images"], region_batch["expression"])
        feats = m.encode_images(region_batch["images"])
        reused, *_ = m.segment(None, region_batch["expression"], feats=feats)
        idx = torch.tensor([0, 0, 1])
        shared, *_ = m.segment(None, region_batch["expression"][:3], feats=feats, image_index=idx)
    side = 4 * feats.sam.image_embed.shape[-1]
    assert direct.shape == (4, side, side)
    torch.testing.assert_close(direct, reused)
    torch.testing.assert_close(shared[0], direct[0], atol=1e-5, rtol=1e-4)


def test_describe_logprobs_match_teacher_forcing(tiny_model, region_batch):
    """Sampled captions' per-token log-probs (left-padded batched generation with KV cache) equal the
    log-probs of the same tokens under a right-padded teacher-forced forward pass."""
    m = tiny_model
    torch.manual_seed(0)
    with torch.no_grad():
        feats = m.encode_images(region_batch["images"])
        caps = m.describe(None, region_batch["masks"], feats=feats, sample=True, max_new_tokens=5)
        tokens = m.project(feats)
        answers = [Ids(i, mark="caption") for i in caps.ids]
        seq = m.assemble(m.region_prompts(tokens, region_batch["masks"], torch.arange(4), answers))
        hidden = m.lm_hidden(seq)
        r, c = seq.marks["caption"]
        logp = torch.log_softmax(m.logits_at(hidden[r, c - 1]), -1)
        forced = logp.gather(-1, seq.input_ids[r, c].unsqueeze(-1)).squeeze(-1)
    assert len(caps.texts) == 4 and all(len(i) == len(lp) for i, lp in zip(caps.ids, caps.logprobs))
    torch.testing.assert_close(forced, torch.cat(caps.logprobs), atol=1e-4, rtol=1e-4)


def test_region_cells_cover_mask_and_keep_tiny_regions():
    """A region's tokens are the image tokens of the cells its mask covers, as rows of the batch's image tokens
    read as one matrix; a region smaller than one cell keeps its best-covered cell instead of vanishing (Sa2VA
    would give K = 0)."""
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)  # 4x4 grid of 16 cells an image
    masks[0, :4, :4] = True  # top-left quarter = cells 0, 1, 4, 5
    masks[1, 7, 7] = True  # one pixel in the last cell
    assert GroundedVLM.region_cells(16, masks) == [[0, 1, 4, 5], [16 + 15]]  # region 1 lies in image 1
    assert GroundedVLM.region_cells(16, masks, torch.tensor([1, 0])) == [[16, 17, 20, 21], [15]]


def test_region_cells_by_block_sums_equal_pooling():
    """Host masks whose sides the grid divides are counted by block sums: the shares, and the cells (half-covered
    ones, and the best-covered one of a region with none), are those that pooling a float copy gives, for bool and
    uint8 masks; masks the grid does not divide (60 px in 16 cells) are pooled."""
    gen = torch.Generator().manual_seed(0)
    for size, side in ((64, 4), (60, 4), (48, 16), (60, 16)):
        masks = torch.rand(12, size, size, generator=gen) > torch.rand(12, 1, 1, generator=gen)
        masks[0:3] = False
        masks[1, :2, :2] = True  # under half a cell
        masks[2, : size // side // 2, :] = True  # exactly half of each cell of the first row
        pooled = torch.nn.functional.adaptive_avg_pool2d(masks.float().unsqueeze(1), side).flatten(1)
        cover = grounded_vlm._cell_cover(masks, side)
        torch.testing.assert_close(cover, pooled, rtol=0, atol=1e-6)  # one ulp where a cell is not 2^k pixels
        keep = pooled >= 0.5
        empty = ~keep.any(dim=1)
        keep[empty, pooled[empty].argmax(dim=1)] = True
        expected = [(i * side * side + keep[i].nonzero().flatten()).tolist() for i in range(len(masks))]
        assert GroundedVLM.region_cells(side * side, masks) == expected
        assert GroundedVLM.region_cells(side * side, masks.to(torch.uint8)) == expected


def test_default_trainable_set_is_sa2va(tiny_model):
    """Trainable by default: LoRA, new token rows, mlp1, SAM decoder + prompt encoder, text_hidden_fcs.
    Frozen: vision tower, LLM base weights, SAM image encoder."""
    names = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("trainable_tokens_delta" in n for n in names)
    assert any(n.startswith("text_hidden_fcs") for n in names)
    assert any("multi_modal_projector" in n for n in names)
    assert any(n.startswith("sam.sam_mask_decoder") for n in names)
    for frozen in ("vision_tower", "sam.image_encoder", "q_proj.base_layer"):
        assert not any(frozen in n for n in names), frozen


def test_save_and_load_pretrained_round_trip(tmp_path, tiny_spec, region_batch):
    """A saved model directory reloads into a model that gives identical mask logits."""
    spec = tiny_spec.model_copy(deep=True)
    spec.trainable.lora = False
    spec.seed = 3
    a = build_model(spec).eval()
    save_pretrained(a, tmp_path / "m")
    spec.pretrained = str(tmp_path / "m")
    spec.seed = 4  # a different random init, overwritten by the loaded weights
    b = build_model(spec).eval()
    with torch.no_grad():
        la, *_ = a.segment(region_batch["images"], region_batch["expression"])
        lb, *_ = b.segment(region_batch["images"], region_batch["expression"])
    torch.testing.assert_close(la, lb)
    load_weights(b, tmp_path / "m" / "model.safetensors")  # loading twice is harmless


def test_architecture_mismatch_is_refused(tmp_path, tiny_spec):
    """Starting from a directory built with other sizes fails with the differing keys named."""
    spec = tiny_spec.model_copy(deep=True)
    spec.trainable.lora = False
    save_pretrained(build_model(spec), tmp_path / "m")
    spec.pretrained = str(tmp_path / "m")
    spec.text.layers = 3
    try:
        build_model(spec)
    except ValueError as err:
        assert "model.text.layers: recipe 3 vs checkpoint 2" in str(err)
    else:
        raise AssertionError("mismatch not detected")


def test_committed_pretrained_checkpoint_refers():
    """The committed tiny checkpoint loads into the default recipe's model and segments held-out regions
    from their expressions far better than random init does (random init: mIoU about 0.05)."""
    from dualrl.algo.losses import mask_iou
    from dualrl.data.scenes import ShapesDataset, collate_regions
    from dualrl.recipe import load_recipe

    spec = load_recipe("recipes/sft_dual.yaml", ["output_dir=unused"]).model
    model = build_model(spec).eval()
    ds = ShapesDataset("val", 32)
    batch = collate_regions([ds[i] for i in range(32)])
    with torch.no_grad():
        logits, *_ = model.segment(batch["images"], batch["expression"])
    assert mask_iou(logits, batch["masks"]).mean() > 0.35


def test_images_are_encoded_once_for_describe_and_segment(tiny_model, region_batch, monkeypatch):
    """Describing and then segmenting the same batch without autograd encodes the images once; new weights
    or a new images tensor encode again."""
    from dualrl.model import sam as samlib

    calls = []
    original = samlib.encode
    monkeypatch.setattr(samlib, "encode", lambda *a: calls.append(1) or original(*a))
    images = region_batch["images"].clone()
    with torch.no_grad():
        tiny_model.describe(images, region_batch["masks"], max_new_tokens=2)
        tiny_model.segment(images, region_batch["expression"])
        assert len(calls) == 1
        tiny_model.load_trainable(tiny_model.trainable_state())
        tiny_model.segment(images, region_batch["expression"])
        tiny_model.segment(images.clone(), region_batch["expression"])
    assert len(calls) == 3


def test_encoding_is_not_reused_after_encoder_weights_change(tiny_model, region_batch):
    """An optimizer-style in-place update of an encoder weight invalidates the kept encoding."""
    images = region_batch["images"].clone()
    with torch.no_grad():
        first = tiny_model.encode_images(images)
        assert tiny_model.encode_images(images) is first
        weight = next(tiny_model.sam.image_encoder.parameters())
        weight.add_(0.0)  # bumps the version counter as an optimizer step does
        assert tiny_model.encode_images(images) is not first


def test_a_ready_causal_padding_mask_gives_what_transformers_builds(tiny_model, region_batch):
    """lm_hidden hands the LLM a ready 4-D mask on GPUs (no host-side padding check): on a padded batch it must
    give the hidden states transformers' own 2-D mask handling gives."""
    from dualrl.model.grounded_vlm import causal_padding_mask

    with torch.no_grad():
        feats = tiny_model.encode_images(region_batch["images"])
        image_tokens = tiny_model.project(feats)
        texts = ["the red one", "a small blue circle on the left of the big square", "it", "the shape"]
        batch = tiny_model.assemble(tiny_model.segment_prompts(image_tokens, torch.arange(4), texts))
        assert not batch.attention_mask.bool().all()  # padded rows: the case that matters
        plain = tiny_model.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        ready_mask = causal_padding_mask(batch.attention_mask)
        ready = tiny_model.lm(inputs_embeds=batch.inputs_embeds, attention_mask=ready_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ready.last_hidden_state[real], plain.last_hidden_state[real], rtol=1e-5, atol=1e-5)


def test_right_padded_rows_need_no_mask(tiny_model, region_batch, monkeypatch):
    """lm_hidden gives right-padded rows to sdpa with no mask (causal only, so flash kernels can run): every token's
    hidden state is the one transformers' padding mask gives, on rows of different lengths; and transformers
    builds no mask, so it never looks for packed sequences (a host wait on a GPU)."""
    import transformers.masking_utils

    assert tiny_model.lm.config._attn_implementation == "sdpa"
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", None)  # called: TypeError
    with torch.no_grad():
        feats = tiny_model.encode_images(region_batch["images"])
        image_tokens = tiny_model.project(feats)
        texts = ["the red one", "a small blue circle on the left of the big square", "it", "the shape"]
        batch = tiny_model.assemble(tiny_model.segment_prompts(image_tokens, torch.arange(4), texts))
        assert not batch.padded_left and not batch.attention_mask.bool().all()
        hidden = tiny_model.lm_hidden(batch)
        plain = tiny_model.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(hidden[real], plain.last_hidden_state[real], rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_keep_their_padding_mask(tiny_model, region_batch, monkeypatch):
    """Only an LLM whose layers all attend fully gets its masks prepared as none: a sliding window is a mask too,
    so with sliding layers the padding mask goes in and transformers builds the window's."""
    given = []

    def spy(inputs_embeds, attention_mask, **kwargs):  # what the LLM is given; its pass is not needed here
        given.append(attention_mask)
        return SimpleNamespace(last_hidden_state=inputs_embeds)

    monkeypatch.setattr(tiny_model.lm, "forward", spy)
    with torch.no_grad():
        image_tokens = tiny_model.project(tiny_model.encode_images(region_batch["images"]))
        batch = tiny_model.assemble(tiny_model.segment_prompts(image_tokens, torch.arange(4), ["a", "the red one"] * 2))
        tiny_model.lm_hidden(batch)
        layers = len(tiny_model.lm.config.layer_types)
        monkeypatch.setattr(tiny_model.lm.config, "layer_types", ["sliding_attention"] * layers)
        tiny_model.lm_hidden(batch)
    assert given[0] == {"full_attention": None}
    assert isinstance(given[1], torch.Tensor) and given[1].shape == batch.attention_mask.shape
