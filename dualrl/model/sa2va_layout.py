"""Sa2VA's Hugging Face checkpoint layout: which GroundedVLM weight is stored under which Sa2VA name.

The layout is the `state_dict` of Sa2VA's `Sa2VAChatModel` (magic-research/Sa2VA,
`projects/llava_sam2/hf/models/modeling_sa2va_chat.py`), stored as safetensors:

    vision_model.*                  original InternViT names (see below)
    mlp1.{0,1,3}.*                  LayerNorm, Linear, (GELU), Linear
    language_model.*                the LLM under its original names (written with lm_head even when tied):
                                    Qwen2ForCausalLM (1B/4B, InternVL3): `model.*`, `lm_head.weight`;
                                    InternLM2ForCausalLM (8B): see "InternLM2" below
    grounding_encoder.sam2_model.*  official SAM2 names, except the memory fuser's layer scale
                                    `memory_encoder.fuser.layers.N.gamma`, which the HF copy calls `.g_weight`
    text_hidden_fcs.{0,2}.*

InternViT (original) vs transformers' InternVL vision tower (per layer N; as in transformers'
`convert_internvl_weights_to_hf.py`): `embeddings.class_embedding` = `embeddings.cls_token`,
`embeddings.position_embedding` = `embeddings.position_embeddings`, `embeddings.patch_embedding` =
`embeddings.patch_embeddings.projection`, `encoder.layers.N` = `encoder.layer.N`, `ls1/ls2` = `lambda_1/2`,
`norm1/norm2` = `layernorm_before/after`, `attn.proj` = `attention.projection_layer`, `attn.q_norm/k_norm` =
`attention.q_norm/k_norm` (InternViT-6B only), `mlp.fc1/fc2` unchanged, and `attn.qkv` (weight, and bias when
`qkv_bias`) = the rows of `attention.q_proj`, `k_proj`, `v_proj` stacked in that order.

InternLM2 (original) vs transformers' Llama, which computes the same thing: `model.tok_embeddings` =
`model.embed_tokens`, `output` = `lm_head`, per layer `attention_norm` / `ffn_norm` = `input_layernorm` /
`post_attention_layernorm`, `attention.wo` = `self_attn.o_proj`, `feed_forward.w1 / w3 / w2` = `mlp.gate_proj /
up_proj / down_proj`, and `attention.wqkv` holds q, k and v grouped by key-value head: for each of the
`num_key_value_heads` groups, its `heads / kv_heads` query heads, then its key head, then its value head (rows of
`head_dim` each; the order InternLM2's attention reshapes them in).

Training checkpoints (Sa2VA's `all_state_dict` before `convert_to_hf.py`) prefix the MLLM keys with
`mllm.model.` and keep SAM2's own `.gamma`; `normalize` turns them into the HF spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SAM_PREFIX = "grounding_encoder.sam2_model."
SA2VA_PREFIXES = ("vision_model.", "mlp1.", "language_model.", SAM_PREFIX, "text_hidden_fcs.")
# (input embedding, output head) names per `model.text.arch`
LM_NAMES = {
    "qwen2": ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"),
    "internlm2": ("language_model.model.tok_embeddings.weight", "language_model.output.weight"),
}
LLM_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}
# Parts the image-level model runs: an unexpected key there means the architectures differ.
USED_PREFIXES = (
    "vision_model.",
    "mlp1.",
    "language_model.",
    "text_hidden_fcs.",
    *(SAM_PREFIX + p for p in ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")),
)
# Sa2VA's chat templates (projects/llava_sam2/hf/models/templates.py): name -> (model.prompts.chat, the answer's
# end, model.prompts.answer_end). internlm2_chat and qwen_chat are the same turns.
_IM_TURN = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATES = {
    "phi3_chat": ("<|user|>\n{input}<|end|>\n<|assistant|>\n", "<|end|>"),
    "qwen_chat": (_IM_TURN, "<|im_end|>"),
    "internlm2_chat": (_IM_TURN, "<|im_end|>"),
}

_VISION_RULES = (
    (r"\.embeddings\.cls_token$", ".embeddings.class_embedding"),
    (r"\.embeddings\.position_embeddings$", ".embeddings.position_embedding"),
    (r"\.embeddings\.patch_embeddings\.projection\.", ".embeddings.patch_embedding."),
    (r"\.encoder\.layer\.(\d+)\.", r".encoder.layers.\1."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.[qkv]_proj\.", ".attn.qkv."),  # q, k, v of one layer share this name: stacked rows
    (r"\.attention\.", ".attn."),  # q_norm, k_norm
)
_INTERNLM2_RULES = (
    (r"^language_model\.model\.embed_tokens\.", "language_model.model.tok_embeddings."),
    (r"^language_model\.lm_head\.", "language_model.output."),
    (r"\.self_attn\.[qkv]_proj\.", ".attention.wqkv."),  # grouped by KV head, see the module docstring
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
)
# (GroundedVLM state-dict prefix, Sa2VA prefix, renames applied after the prefix swap)
_SECTIONS = (
    ("vlm.model.vision_tower.", "vision_model.", _VISION_RULES),
    (
        "vlm.model.multi_modal_projector.",
        "mlp1.",
        ((r"^mlp1\.layer_norm\.", "mlp1.0."), (r"^mlp1\.linear_1\.", "mlp1.1."), (r"^mlp1\.linear_2\.", "mlp1.3.")),
    ),
    ("vlm.model.language_model.", "language_model.model.", ()),
    ("vlm.lm_head.", "language_model.lm_head.", ()),
    ("sam.", SAM_PREFIX, ((r"\.fuser\.layers\.(\d+)\.gamma$", r".fuser.layers.\1.g_weight"),)),
    ("text_hidden_fcs.", "text_hidden_fcs.", ()),
)
_LLM_RULES = {"qwen2": (), "internlm2": _INTERNLM2_RULES}  # applied to language_model.* names


def sa2va_name(name: str, arch: str = "qwen2") -> str:
    """GroundedVLM state-dict name (adapter wrappers removed) -> Sa2VA name, for an LLM of `arch`."""
    for ours, theirs, rules in _SECTIONS:
        if name.startswith(ours):
            out = theirs + name[len(ours) :]
            if theirs.startswith("language_model."):
                rules = _LLM_RULES[arch]
            for pattern, repl in rules:
                out = re.sub(pattern, repl, out)
            return out
    raise KeyError(f"no Sa2VA name for {name!r}")


def groups(names: Iterable[str], arch: str) -> dict[str, list[str]]:
    """Sa2VA name -> the GroundedVLM names stored in it (three for a fused qkv, in q, k, v order)."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(sa2va_name(name, arch), []).append(name)
    return out


def normalize(key: str) -> str:
    """Training-checkpoint spelling -> HF spelling (what Sa2VA's convert_to_hf.py does)."""
    key = key.removeprefix("mllm.model.")
    if key.startswith(SAM_PREFIX):
        key = re.sub(r"\.fuser\.layers\.(\d+)\.gamma$", r".fuser.layers.\1.g_weight", key)
    return key


def template_of(chat: str) -> str | None:
    """The Sa2VA template whose turns `model.prompts.chat` writes (qwen_chat for the `<|im_start|>` turns)."""
    return next((name for name, (turns, _) in TEMPLATES.items() if turns == chat), None)
