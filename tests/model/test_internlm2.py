"""InternLM2 LLMs (Sa2VA-8B): run as transformers' Llama, stored under InternLM2's names with a grouped wqkv.

The reference below computes InternLM2's forward pass from the exported tensors alone, as InternLM2's own
attention reads them (per key-value head: its query heads, then one key head, then one value head), so a wrong
interleave of q, k and v in the export cannot agree with it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dualrl.model.build import build_model
from dualrl.model.checkpoint_config import resolve_model_spec
from dualrl.model.sa2va_convert import from_sa2va, to_sa2va
from dualrl.model.sa2va_format import save_sa2va
from dualrl.recipe import RecipeError
from tests.model.test_sa2va_format import _build, _max_diff, _outputs, _perturb

LM = "language_model."


@pytest.fixture(scope="module")
def spec(tiny_spec):
    spec = tiny_spec.model_copy(deep=True)
    spec.text.arch = "internlm2"
    spec.text.heads, spec.text.kv_heads = 4, 2  # two query heads per key-value head: the grouping matters
    return spec


@pytest.fixture(scope="module")
def trained(spec):
    model = _build(spec, seed=0, lora=True, tied=False)
    _perturb(model)
    return model, to_sa2va(model)


def _internlm2_logits(state: dict, t, embeds: torch.Tensor) -> torch.Tensor:
    """InternLM2's causal LM on one sequence of input embeddings [T, H], from Sa2VA-layout tensors."""
    n, h, kv = embeds.shape[0], t.hidden_size, t.kv_heads
    hd, g = h // t.heads, t.heads // t.kv_heads
    inv_freq = 1.0 / t.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(n).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # [heads, T, hd], rotate-half
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + t.rms_norm_eps)

    causal = torch.full((n, n), float("-inf")).triu(1)
    x = embeds
    for i in range(t.layers):
        w = {k[len(f"{LM}model.layers.{i}.") :]: v for k, v in state.items() if k.startswith(f"{LM}model.layers.{i}.")}
        qkv = (rms(x, w["attention_norm.weight"]) @ w["attention.wqkv.weight"].T).reshape(n, kv, g + 2, hd)
        q = rope(qkv[:, :, :g].reshape(n, kv * g, hd).transpose(0, 1))
        k = rope(qkv[:, :, g].transpose(0, 1)).repeat_interleave(g, 0)
        v = qkv[:, :, g + 1].transpose(0, 1).repeat_interleave(g, 0)
        att = (q @ k.transpose(1, 2) / hd**0.5 + causal).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(n, h) @ w["attention.wo.weight"].T
        y = rms(x, w["ffn_norm.weight"])
        x = (
            x
            + (F.silu(y @ w["feed_forward.w1.weight"].T) * (y @ w["feed_forward.w3.weight"].T))
            @ w["feed_forward.w2.weight"].T
        )
    return rms(x, state[f"{LM}model.norm.weight"]) @ state[f"{LM}output.weight"].T


def test_export_uses_internlm2_names_and_its_forward_pass(trained, spec):
    model, state = trained
    t = spec.text
    hd = t.hidden_size // t.heads
    assert f"{LM}model.tok_embeddings.weight" in state and f"{LM}output.weight" in state
    assert state[f"{LM}model.layers.0.attention.wqkv.weight"].shape == ((t.heads + 2 * t.kv_heads) * hd, t.hidden_size)
    lm_keys = [k for k in state if k.startswith(LM)]
    assert not any(".self_attn." in k or ".mlp." in k or "embed_tokens" in k or "lm_head" in k for k in lm_keys)
    ids = torch.randint(0, t.vocab_size, (11,))
    seg = model.tokenizer.convert_tokens_to_ids("[SEG]")
    ids[5] = seg  # a new token's trained row must be in the export too
    embeds = state[f"{LM}model.tok_embeddings.weight"][ids]
    with torch.no_grad():
        ours = model.logits_at(model.lm(inputs_embeds=model.vlm.get_input_embeddings()(ids)[None]).last_hidden_state)[0]
    reference = _internlm2_logits(state, t, embeds)
    assert (ours - reference).abs().max().item() < 1e-4


def test_round_trip_gives_identical_outputs(trained, spec, region_batch):
    a, state = trained
    b = _build(spec, seed=1, lora=False, tied=False)
    report = from_sa2va(b, state)
    assert not report.real
    diff = _max_diff(_outputs(a, region_batch), _outputs(b, region_batch))
    assert all(v < 1e-5 for v in diff.values()), diff


def test_a_qwen2_recipe_on_an_internlm2_checkpoint_is_named(trained, tiny_spec, spec):
    _, state = trained
    qwen = _build(tiny_spec, seed=1, lora=False, tied=False)
    with pytest.raises(ValueError, match=r"InternLM2ForCausalLM .*set model\.text\.arch=internlm2"):
        from_sa2va(qwen, state)
    # A checkpoint with more token rows (its tokenizer grew) names the vocab_size to set.
    rows = {
        k: torch.cat([v, v[:3]]) for k, v in state.items() if k.endswith(("tok_embeddings.weight", "output.weight"))
    }
    with pytest.raises(ValueError, match=rf"set model\.text\.vocab_size={spec.text.vocab_size + 3} "):
        from_sa2va(_build(spec, seed=1, lora=False, tied=False), {**state, **rows})


def test_config_names_the_llm_and_a_recipe_mismatch(trained, spec, tmp_path):
    """The directory's config.json states an InternLM2 LLM; a recipe that says otherwise is refused by key, and one
    that leaves the LLM out (here: whether it is tied) builds the checkpoint's."""
    model, _ = trained
    save_sa2va(model, model.tokenizer, tmp_path / "ckpt", template="qwen_chat")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert config["llm_config"]["num_key_value_heads"] == 2 and config["llm_config"]["bias"] is False
    wrong = spec.model_copy(deep=True)
    wrong.sa2va = str(tmp_path / "ckpt")
    wrong.text.arch, wrong.text.kv_heads, wrong.vision.patch_size = "qwen2", 4, 16
    with pytest.raises(RecipeError) as err:
        resolve_model_spec(wrong)
    assert "model.text.arch: recipe 'qwen2' vs checkpoint 'internlm2'" in str(err.value)
    assert "model.text.kv_heads: recipe 4 vs checkpoint 2" in str(err.value) and "model.vision.patch_size" in str(
        err.value
    )
    with pytest.raises(ValueError, match=r"model\.text\.kv_heads"):
        build_model(wrong)
    good = spec.model_copy(deep=True)
    good.sa2va, good.trainable.lora = str(tmp_path / "ckpt"), False
    assert "tie_word_embeddings" not in good.text.model_fields_set
    rebuilt = build_model(good)
    assert not rebuilt.vlm.config.tie_word_embeddings and rebuilt.spec.prompts.answer_end == "<|im_end|>"
    assert torch.equal(
        to_sa2va(rebuilt)[f"{LM}model.layers.1.attention.wqkv.weight"],
        to_sa2va(model)[f"{LM}model.layers.1.attention.wqkv.weight"],
    )
