"""The caption decoding engine gives what transformers' `generate` gives: the same greedy captions, the same samples
for the same seed, the same log-probs, with G samples of a region sharing one prefill, at any prompt length, with
one- and several-token answer ends, and for sdpa and eager attention."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from dualrl.data.scenes import ShapesDataset, collate_regions
from dualrl.model.build import build_model
from dualrl.model.sampling import Sampling, choose
from dualrl.recipe import load_recipe


def _pretrained_spec(*overrides):
    """The committed tiny checkpoint: its captions are real sentences that end (random init repeats one token)."""
    return load_recipe("recipes/sft_dual.yaml", ["output_dir=x", "wandb.mode=disabled", *overrides]).model


@pytest.fixture(scope="module")
def model():
    return build_model(_pretrained_spec()).eval()


@pytest.fixture(scope="module")
def regions():
    ds = ShapesDataset("val", 16)
    return collate_regions([ds[i] for i in range(10)])


def _describe(model, regions, generation, seed=0, **kwargs):
    model.spec = model.spec.model_copy(update={"generation": generation})
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.describe(regions["images"], regions["masks"], **kwargs)


def _assert_same(a, b, atol=1e-5):
    assert a.texts == b.texts and a.finished == b.finished
    assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids]
    assert [x.tolist() for x in a.ends] == [x.tolist() for x in b.ends]
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=atol)


def test_greedy_captions_are_generates(model, regions):
    engine = _describe(model, regions, "engine")
    plain = _describe(model, regions, "generate")
    assert sum(engine.finished) >= len(engine) // 2 and all(len(t.split()) >= 3 for t in engine.texts)
    _assert_same(engine, plain)


def test_group_samples_share_a_prefill_and_are_generates(model, regions):
    """G sampled captions per region from one prefill each: the same draws as generate on G copies of each prompt
    (same seed), so the engine's samples follow the same distribution, log-probs included."""
    kwargs = {"group_size": 3, "sample": True, "temperature": 1.3, "top_p": 0.9}
    engine = _describe(model, regions, "engine", seed=5, **kwargs)
    plain = _describe(model, regions, "generate", seed=5, **kwargs)
    assert len(engine) == 3 * len(regions["masks"])
    assert len(set(engine.texts)) > len(regions["masks"])  # samples of one region differ
    _assert_same(engine, plain)


def test_prompt_capacity_grows_and_shapes_are_kept(model, regions):
    """Prompts of any length fit: the decode state (its cache and, on CUDA, its graph) is kept while the prompts
    fit its capacity and replaced by a larger one, in steps of `bucket`, when a longer one comes; captions stay
    generate's throughout."""
    decoder = model.decoder
    decoder._states.clear()
    decoder.bucket, decoder.prefill_bucket = 8, 1
    try:
        small = {k: v[:4] for k, v in regions.items() if isinstance(v, torch.Tensor)}
        tiny_region = small["masks"].clone()
        tiny_region[:] = 0
        tiny_region[:, 60:64, 60:64] = 1  # one ViT cell: the shortest prompt
        full = small["masks"].clone()
        full[:] = 1  # every cell: the longest prompt
        states = []
        for masks in (tiny_region, tiny_region, full, tiny_region):
            batch = {"images": small["images"], "masks": masks}
            _assert_same(_describe(model, batch, "engine"), _describe(model, batch, "generate"))
            states.append(next(iter(decoder._states.values())))
        assert states[0] is states[1] and states[1] is not states[2] and states[2] is states[3]
        assert states[0].capacity < states[2].capacity and all(s.capacity % 8 == 0 for s in states)
        assert len(decoder._states) == 1
    finally:
        decoder.bucket, decoder.prefill_bucket = 128, 64
        decoder._states.clear()


def test_an_answer_end_of_several_tokens_stops_rows_as_generate_does(regions):
    """A text end ("on the" stands in for a Qwen tokenizer's several-token `<|end|>`) is found on the host each step."""
    model = build_model(_pretrained_spec('model.prompts.answer_end="on the"')).eval()
    assert len(model.end_ids) > 1
    engine = _describe(model, regions, "engine")
    plain = _describe(model, regions, "generate")
    assert any(engine.finished) and all(" on" not in t for t, f in zip(engine.texts, engine.finished) if f)
    _assert_same(engine, plain)


def test_eager_attention_decodes_the_same_captions(regions):
    model = build_model(_pretrained_spec("model.attn_implementation=eager")).eval()
    _assert_same(_describe(model, regions, "engine"), _describe(model, regions, "generate"))


def test_choose_keeps_the_top_p_nucleus_and_reports_temperature_log_probs():
    """probs 0.5, 0.3, 0.15, 0.05 with top_p 0.8: transformers drops the tail whose mass is <= 0.2 (0.05 and 0.15)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    torch.manual_seed(0)
    token, logprob = choose(logits, Sampling(sample=True, temperature=1.0, top_p=0.8))
    assert set(token.tolist()) == {0, 1}
    share = (token == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03  # renormalised over the nucleus
    torch.testing.assert_close(logprob, probs.log()[token])  # under the temperature-scaled distribution
    token, logprob = choose(logits[:4], Sampling(sample=True, temperature=2.0, top_k=1))
    assert token.tolist() == [0] * 4  # top-k 1 is greedy
    torch.testing.assert_close(logprob, torch.log_softmax(logits[:4] / 2.0, -1)[:, 0])
    token, logprob = choose(logits[:2], Sampling())
    assert token.tolist() == [0, 0] and math.isclose(logprob[0].item(), math.log(0.5), rel_tol=1e-6)


def test_lora_is_folded_for_decoding_and_the_model_is_left_as_it_was(regions):
    """With trained (non-zero) LoRA, the merged copies decode what the adapters compute; afterwards every layer
    computes with its own weights and adapters again, and the merged copies follow in-place weight updates."""
    model = build_model(_pretrained_spec()).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and model.decoder.lora.usable()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _assert_same(_describe(model, regions, "engine"), _describe(model, regions, "generate"), atol=1e-4)
    layers = model.decoder.lora.layers
    assert all(not m.disable_adapters for m in layers)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():  # an optimizer step between calls: the next call decodes with the new weights
        for p in lora_b:
            p.mul_(-3.0)
    _assert_same(_describe(model, regions, "engine"), _describe(model, regions, "generate"), atol=1e-4)
    merged = model.decoder.lora.weights[0]
    expected = layers[0].base_layer.weight + layers[0].get_delta_weight(layers[0].active_adapters[0])
    torch.testing.assert_close(merged, expected)


def test_the_compiled_step_decodes_generates_captions(regions):
    """model.decode_compile: the decode step's layers compiled by torch.compile (inductor's C++ kernels on a CPU)
    decode the same greedy captions and the same seeded samples, log-probs included, across two row counts; the
    layers share their compilations (two for the first shape, two for the second: not one per layer), and run
    uncompiled again after the call."""
    model = build_model(_pretrained_spec("model.decode_compile=true")).eval()
    assert model.decoder.compile
    _assert_same(_describe(model, regions, "engine"), _describe(model, regions, "generate"))
    kwargs = {"group_size": 2, "sample": True, "temperature": 1.3, "top_p": 0.9}
    _assert_same(
        _describe(model, regions, "engine", seed=5, **kwargs), _describe(model, regions, "generate", seed=5, **kwargs)
    )
    assert model.decoder._compiled is not None
    assert all(layer._compiled_call_impl is None for layer in model.lm.layers)


def test_fused_projections_decode_generates_captions(regions):
    """model.decode_fuse_projections: q/k/v and gate/up as one product each, with trained LoRA folded into the fused
    copies, compiled layers or not: generate's greedy captions and seeded samples, log-probs included. The model's
    own projection modules are back after every call and the fused copies follow in-place weight updates."""
    model = build_model(_pretrained_spec("model.decode_fuse_projections=true")).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.02)
    attention = model.lm.layers[0].self_attn
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    kwargs = {"group_size": 2, "sample": True, "temperature": 1.3, "top_p": 0.9}
    for compiled in (False, True):
        model.spec = model.spec.model_copy(update={"decode_compile": compiled})
        model._decoder = None
        _assert_same(_describe(model, regions, "engine"), _describe(model, regions, "generate"), atol=1e-4)
        fused = model.decoder.fused
        assert model.decoder._fusing and len(fused.groups) == 2 * len(model.lm.layers)
        folded = {id(m) for m in fused.lora_layers()}  # folded into the fused copies, not also into LoRA's
        assert folded and not folded & {id(m) for m in model.decoder.lora.layers}
        assert {type(m).__name__ for m in model.decoder.lora.layers} == {"Linear"}  # o_proj, down_proj
        assert (attention.q_proj, attention.k_proj, attention.v_proj) == projections
        engine = _describe(model, regions, "engine", seed=5, **kwargs)
        _assert_same(engine, _describe(model, regions, "generate", seed=5, **kwargs), atol=1e-4)
    with torch.no_grad():  # an optimizer step between calls: the next call decodes with the new weights
        for p in lora_b:
            p.mul_(-3.0)
    _assert_same(_describe(model, regions, "engine"), _describe(model, regions, "generate"), atol=1e-4)
    q = attention.q_proj
    rows = fused.fused[0].weight[: q.base_layer.out_features]
    torch.testing.assert_close(rows, q.base_layer.weight + q.get_delta_weight(q.active_adapters[0]))


def test_hot_sampling_uses_generates_top_k(model, regions):
    """At temperature 2 without top-p, transformers' default top-k (50) decides which tokens can be drawn: the
    samples stay generate's only if the engine applies it too."""
    kwargs = {"group_size": 2, "sample": True, "temperature": 2.0, "top_p": 1.0}
    engine = _describe(model, regions, "engine", seed=3, **kwargs)
    _assert_same(engine, _describe(model, regions, "generate", seed=3, **kwargs))


def test_rows_stop_at_their_end_and_the_loop_when_all_have(model, regions):
    """Called directly: a row's tokens after its end are padding, and decoding stops once every row has ended
    (at the next check), well before max_new."""
    with torch.no_grad():
        feats = model.encode_images(regions["images"], sam=False)
        tokens = model.project(feats)
        batch = model.assemble(
            model.region_prompts(tokens, regions["masks"], torch.arange(len(regions["masks"]))), pad_left=True
        )
        out = model.decoder(batch.inputs_embeds, batch.attention_mask, 1, 64, Sampling(), model.eos_id, model.pad_id)
    assert out.tokens.shape[1] < 32
    for row in out.tokens:
        ends = (row == model.eos_id).nonzero()
        assert len(ends), "every tiny caption ends well within 32 tokens"
        assert (row[int(ends[0]) + 1 :] == model.pad_id).all()


def test_trainable_token_rows_updated_in_place_reach_the_next_call(regions):
    """The embedding and head matrices (trainable token rows merged in) are refreshed every call: an optimizer
    step on those rows between calls changes what the engine decodes exactly as it changes generate's."""
    model = build_model(_pretrained_spec()).eval()
    deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert deltas
    before = _describe(model, regions, "engine")  # the decoder's matrices placed
    torch.manual_seed(2)
    with torch.no_grad():  # large new rows: Sa2VA's tokens become likely outputs, so decoding must change
        for p in deltas:
            p.add_(torch.randn_like(p) * 3.0)
    after = _describe(model, regions, "generate")
    assert [x.tolist() for x in after.ids] != [x.tolist() for x in before.ids]
    _assert_same(_describe(model, regions, "engine"), after)


def test_a_decoder_call_inside_another_is_refused(model, regions):
    calls = []

    def nested(tokens):
        if not calls:
            calls.append(1)
            model.describe(regions["images"], regions["masks"], max_new_tokens=2)
        return torch.zeros(len(tokens), dtype=torch.bool)

    model.spec = model.spec.model_copy(update={"generation": "engine"})
    with torch.no_grad():
        feats = model.encode_images(regions["images"], sam=False)
        tokens = model.project(feats)
        batch = model.assemble(
            model.region_prompts(tokens, regions["masks"], torch.arange(len(regions["masks"]))), pad_left=True
        )
        with pytest.raises(RuntimeError, match="not re-entrant"):
            model.decoder(batch.inputs_embeds, batch.attention_mask, 1, 4, Sampling(), None, model.pad_id, nested)
        model.decoder(batch.inputs_embeds, batch.attention_mask, 1, 2, Sampling(), None, model.pad_id)  # usable again


def test_generation_settings_the_engine_does_not_apply_are_refused(regions):
    model = build_model(_pretrained_spec()).eval()
    model.vlm.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="repetition_penalty"):
        _describe(model, regions, "engine")
    _describe(model, regions, "generate")  # generate applies it


def test_the_decoder_does_not_keep_its_model_alive(regions):
    model = build_model(_pretrained_spec()).eval()
    _describe(model, regions, "engine")
    ref = weakref.ref(model)
    del model
    assert ref() is None


def test_features_encoded_for_captioning_cannot_segment(model, regions):
    with torch.no_grad():
        feats = model.encode_images(regions["images"], sam=False)
        model.encodings.clear()
        with pytest.raises(ValueError, match="no SAM2 encoding"):
            model.segment(None, ["the circle"] * len(regions["masks"]), feats=feats)


def test_new_prompt_lengths_after_the_first_call_compile_nothing():
    """With the layers compiled, the first call also prefills its prompts one bucket longer, so torch.compile has
    met two lengths and compiles for any: later calls whose prompts have other lengths compile nothing, where the
    second length used to stall a later step."""
    from torch._dynamo.utils import counters

    model = build_model(_pretrained_spec("model.decode_compile=true")).eval()
    model.decoder.prefill_bucket = 1  # every prompt length its own shape (106-113 tokens for these regions)
    ds = ShapesDataset("val", 64)
    batches = [collate_regions([ds[i]]) for i in range(8)]  # one region a call: its size sets the prompt's length
    lengths, compiled = [], []
    prefill = model.decoder._prefill

    def seen(embeds, attention):
        lengths.append(attention.shape[1])
        return prefill(embeds, attention)

    model.decoder._prefill = seen
    for batch in batches:
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            model.describe(batch["images"], batch["masks"], max_new_tokens=4)
        compiled.append(counters["stats"]["unique_graphs"] - before)
    assert len(set(lengths[2:]) - set(lengths[:2])) > 0, lengths  # later calls brought lengths the first had not
    assert compiled[0] > 0 and compiled[1:] == [0] * (len(batches) - 1), compiled
