"""Sa2VA HF layout: export with LoRA and new token rows merged, load with a key report, refuse mismatches."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from dualrl.model import sa2va_convert, sa2va_format, sa2va_layout
from dualrl.model.build import build_model
from dualrl.model.sa2va_convert import from_sa2va, to_sa2va
from dualrl.model.sa2va_format import load_sa2va_state, save_sa2va
from dualrl.model.sa2va_layout import SA2VA_PREFIXES

QKV = "vision_model.encoder.layers.0.attn.qkv.weight"


def _build(spec, seed: int, lora: bool, tied: bool = True):
    spec = spec.model_copy(deep=True)
    spec.seed = seed
    spec.trainable.lora = lora
    spec.text.tie_word_embeddings = tied
    return build_model(spec).eval()


def _perturb(model) -> None:
    """Trained-looking adapters: non-zero LoRA B, and new token rows ([SEG] first) unlike the base rows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        masks, hidden, *_ = model.segment(batch["images"], batch["expression"])
        caps = model.describe(batch["images"], batch["masks"], max_new_tokens=4)
        return {
            "masks": masks,
            "hidden": hidden,
            "logits": model.logits_at(hidden),
            "caption_ids": torch.cat(caps.ids),
            "caption_logprobs": torch.cat(caps.logprobs),
        }


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for k in a:
        assert a[k].shape == b[k].shape, k
        out[k] = (a[k].float() - b[k].float()).abs().max().item()
    return out


@pytest.fixture(scope="module")
def trained(tiny_spec):
    """Model A: LoRA + trainable token rows, perturbed so that merging matters, and its Sa2VA export."""
    model = _build(tiny_spec, seed=0, lora=True)
    _perturb(model)
    return model, to_sa2va(model)


def test_round_trip_through_files_gives_identical_outputs(trained, tiny_spec, region_batch, tmp_path):
    """export -> safetensors directory -> load into a model of another seed without LoRA: same mask logits,
    hidden states, LM logits and greedy captions; re-exporting gives the file's tensors bit for bit."""
    a, _ = trained
    b = _build(tiny_spec, seed=1, lora=False)
    before = _max_diff(_outputs(a, region_batch), _outputs(b, region_batch))
    save_sa2va(a, a.tokenizer, tmp_path / "sa2va")
    files = sorted(p.name for p in (tmp_path / "sa2va").iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    report = from_sa2va(b, load_sa2va_state(tmp_path / "sa2va"))
    assert not report.real and not report.missing and not report.unexpected
    diff = _max_diff(_outputs(a, region_batch), _outputs(b, region_batch))
    print("\nround trip A(LoRA, perturbed) -> B(no LoRA) max abs diff:", diff, "\nbefore loading:", before)
    assert before["masks"] > 1e-2 and before["logits"] > 1e-2  # the load is what makes them equal
    assert diff["caption_ids"] == 0
    assert all(v < 1e-5 for v in diff.values()), diff
    again = to_sa2va(b)
    exported = load_sa2va_state(tmp_path / "sa2va")
    assert again.keys() == exported.keys()
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_new_token_rows_and_lora_are_merged(trained):
    """[SEG] and the other new rows are the trained rows in embed_tokens and lm_head; LoRA is folded in."""
    a, state = trained
    seg = a.tokenizer.convert_tokens_to_ids("[SEG]")
    adapter = a.vlm.model.language_model.embed_tokens.token_adapter
    rows = adapter.token_indices["default"]
    assert seg in rows
    delta = adapter.trainable_tokens_delta["default"].detach()
    torch.testing.assert_close(state["language_model.model.embed_tokens.weight"][rows], delta, rtol=0, atol=0)
    torch.testing.assert_close(state["language_model.lm_head.weight"][rows], delta, rtol=0, atol=0)
    q = a.vlm.model.language_model.layers[0].self_attn.q_proj
    merged = q.base_layer.weight + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(state["language_model.model.layers.0.self_attn.q_proj.weight"], merged)
    assert not any("lora" in k or "base_layer" in k or "token_adapter" in k for k in state)


def test_keys_follow_the_sa2va_layout(trained):
    a, state = trained
    hidden = a.vlm.config.vision_config.hidden_size
    assert all(k.startswith(SA2VA_PREFIXES) for k in state)
    assert state[QKV].shape == (3 * hidden, hidden)
    q = a.vlm.model.vision_tower.encoder.layer[0].attention
    torch.testing.assert_close(state[QKV], torch.cat([q.q_proj.weight, q.k_proj.weight, q.v_proj.weight]))
    for key in (
        "mlp1.0.weight",
        "mlp1.1.weight",
        "mlp1.3.bias",
        "language_model.lm_head.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.1.ls2",
        "vision_model.encoder.layers.0.attn.proj.weight",
        "vision_model.encoder.layers.0.norm1.bias",
        "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight",
        "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight",
        "text_hidden_fcs.0.weight",
        "text_hidden_fcs.2.bias",
    ):
        assert key in state, key
    assert all(v.is_contiguous() for v in state.values())


def test_fresh_lora_model_loads_and_trained_lora_is_refused(trained, tiny_spec, region_batch):
    """A LoRA model with fresh adapters (B = 0) loads the export into its base weights, its trainable token
    rows re-synchronised; a model with trained adapters is refused before anything is written."""
    a, state = trained
    c = _build(tiny_spec, seed=2, lora=True)
    from_sa2va(c, state)
    diff = _max_diff(_outputs(a, region_batch), _outputs(c, region_batch))
    print("\nA(LoRA) -> C(fresh LoRA) max abs diff:", diff)
    assert all(v < 1e-5 for v in diff.values()), diff
    with pytest.raises(ValueError, match="trained LoRA"):
        from_sa2va(a, state)


def test_untied_embeddings_round_trip(tiny_spec, region_batch):
    a = _build(tiny_spec, seed=0, lora=True, tied=False)
    _perturb(a)
    state = to_sa2va(a)
    assert not torch.equal(state["language_model.lm_head.weight"], state["language_model.model.embed_tokens.weight"])
    b = _build(tiny_spec, seed=1, lora=False, tied=False)
    from_sa2va(b, state)
    diff = _max_diff(_outputs(a, region_batch), _outputs(b, region_batch))
    assert all(v < 1e-5 for v in diff.values()), diff


def test_mismatches_are_refused_and_reported(trained, tiny_spec):
    _, state = trained
    b = _build(tiny_spec, seed=1, lora=False)
    wrong = dict(state, **{QKV: state[QKV][:-1]})
    with pytest.raises(ValueError, match=r"attn\.qkv\.weight"):
        from_sa2va(b, wrong)
    key = "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"
    with pytest.raises(ValueError, match="missing " + key):
        from_sa2va(b, {k: v for k, v in state.items() if k != key})
    # The model's architecture lacks a weight of a part it runs (here a qkv bias): refused, not dropped.
    with pytest.raises(ValueError, match="unexpected vision_model"):
        from_sa2va(b, dict(state, **{"vision_model.encoder.layers.0.attn.qkv.bias": torch.zeros(192)}))
    # A tied model cannot hold an lm_head unlike embed_tokens.
    with pytest.raises(ValueError, match="ties them"):
        from_sa2va(b, dict(state, **{"language_model.lm_head.weight": state["language_model.lm_head.weight"] + 1}))
    # Nothing above was written: b still differs from the state.
    assert not torch.equal(to_sa2va(b)[QKV], state[QKV])
    # Foreign keys and SAM2's video-only weights are reported, not refused.
    extra = {k: v for k, v in state.items() if ".memory_attention." not in k}
    extra["some_other_head.weight"] = torch.zeros(3)
    report = from_sa2va(b, extra)
    assert report.unexpected == ["some_other_head.weight"] and not report.real
    assert report.missing and all(".memory_attention." in k for k in report.missing)
    assert "some_other_head.weight" in str(report)
    # strict=False loads what fits and reports the rest.
    report = from_sa2va(b, wrong, strict=False)
    assert [m[0] for m in report.mismatched] == [QKV]
    assert torch.equal(to_sa2va(b)["mlp1.1.weight"], state["mlp1.1.weight"])


def test_training_checkpoint_spelling_loads(trained, tiny_spec):
    """Sa2VA training checkpoints: `mllm.model.` before MLLM keys, SAM2's memory fuser scale as `.gamma`."""
    _, state = trained
    mllm = ("vision_model.", "mlp1.", "language_model.")
    raw = {("mllm.model." + k if k.startswith(mllm) else k.replace(".g_weight", ".gamma")): v for k, v in state.items()}
    assert any(k.endswith(".gamma") for k in raw)
    b = _build(tiny_spec, seed=1, lora=False)
    report = from_sa2va(b, raw)
    assert not report.missing and not report.unexpected
    again = to_sa2va(b)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_sharded_directory_and_config(trained, tmp_path):
    a, state = trained
    save_sa2va(a, a.tokenizer, tmp_path / "s", dtype=torch.bfloat16, shard_bytes=200_000)
    names = {p.name for p in (tmp_path / "s").iterdir()}
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert all(n.endswith((".safetensors", ".json")) for n in names)
    loaded = load_sa2va_state(tmp_path / "s")
    assert loaded.keys() == state.keys()
    assert all(v.dtype == torch.bfloat16 for v in loaded.values())
    torch.testing.assert_close(loaded[QKV], state[QKV].bfloat16())
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model_type"] == "sa2va_chat" and config["architectures"] == ["Sa2VAChatModel"]
    assert config["template"] == "phi3_chat" and config["downsample_ratio"] == 0.5
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert config["llm_config"]["vocab_size"] == state["language_model.model.embed_tokens.weight"].shape[0]
    assert config["vision_config"]["hidden_size"] == a.vlm.config.vision_config.hidden_size
    with pytest.raises(FileExistsError):
        save_sa2va(a, a.tokenizer, tmp_path / "s")


def test_no_pickle_loading():
    for module in (sa2va_format, sa2va_convert, sa2va_layout):
        source = inspect.getsource(module)
        assert "torch.load" not in source and "pickle" not in source, module.__name__


def test_recipe_starts_from_a_sa2va_directory(trained, tiny_spec, region_batch, tmp_path):
    """`model.sa2va: DIR` builds the model with the directory's tokenizer and weights (fresh LoRA on top)."""
    from dualrl.recipe import RecipeError, load_recipe
    from tests.conftest import TINY

    model, _ = trained
    save_sa2va(model, model.tokenizer, tmp_path / "sa2va")
    spec = load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", f"model.sa2va={tmp_path / 'sa2va'}"]).model
    loaded = build_model(spec).eval()
    diff = _max_diff(_outputs(model, region_batch), _outputs(loaded, region_batch))
    assert all(v < 1e-5 for v in diff.values()), diff
    with pytest.raises(RecipeError, match=r"model\.sa2va: no Sa2VA checkpoint"):
        load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", f"model.sa2va={tmp_path}"])
    with pytest.raises(RecipeError, match="exclusive"):
        load_recipe("recipes/sft_dual.yaml", ["output_dir=x", f"model.sa2va={tmp_path / 'sa2va'}"])
