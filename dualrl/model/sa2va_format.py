"""Sa2VA Hugging Face checkpoint directories: write one from a GroundedVLM (`save_sa2va`), read one's weights
(`load_sa2va_state`). The key layout is `sa2va_layout`; the conversion, with LoRA merged on export and a key
report on load, is `sa2va_convert`; what a directory's config.json says about the architecture is read by
`checkpoint_config`.

A directory holds `model.safetensors` (or shards and `model.safetensors.index.json`), the tokenizer and
`config.json` (Sa2VAChatConfig's fields). dualrl adds one entry Sa2VA's config class keeps as a plain
attribute: `dualrl`, the SAM2 settings the weights were trained with (`checkpoint_config.sam_record`), which
the weights alone do not show.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dualrl.model.checkpoint_config import TEXT_KEYS, VISION_KEYS, sam_record
from dualrl.model.grounded_vlm import GroundedVLM
from dualrl.model.sa2va_convert import to_sa2va
from dualrl.model.sa2va_layout import LLM_ARCHITECTURES, LM_NAMES, template_of


def _llm_config(t, arch: str, vocab_size: int) -> dict:
    """`llm_config` of Sa2VAChatConfig: a transformers Qwen2Config, or the fields of InternLM2's own config
    class (configuration_internlm2.py, remote code in InternVL/Sa2VA directories)."""
    rope_theta = (t.rope_parameters or {}).get("rope_theta", 10000.0)
    if arch == "internlm2":
        return {
            "architectures": [LLM_ARCHITECTURES[arch]],
            "model_type": "internlm2",
            **{key: getattr(t, key) for key in TEXT_KEYS.values()},
            "vocab_size": vocab_size,
            "hidden_act": t.hidden_act,
            "rope_theta": rope_theta,
            "rope_scaling": None,
            "bias": False,
            "initializer_range": t.initializer_range,
            "attn_implementation": "eager",
            "use_cache": True,
        }
    llm = t.to_dict()
    llm.update(architectures=[LLM_ARCHITECTURES[arch]], vocab_size=vocab_size)
    llm.setdefault("rope_theta", rope_theta)  # transformers 4.x Qwen2Config reads this
    return llm


def _sa2va_config(model: GroundedVLM, vocab_size: int, template: str | None) -> dict:
    """Sa2VAChatConfig fields (projects/llava_sam2/hf/models/configuration_sa2va_chat.py) for this model.
    No `auto_map`: Sa2VA's remote-code files are not written here (its convert_to_hf.py copies them in)."""
    v, t = model.vlm.config.vision_config, model.vlm.config.text_config
    llm = _llm_config(t, model.spec.text.arch, vocab_size)
    image_size = v.image_size[0]
    template = template or template_of(model.spec.prompts.chat)
    if template is None:
        raise ValueError("no Sa2VA template matches model.prompts.chat; pass template= (e.g. 'phi3_chat')")
    return {
        "architectures": ["Sa2VAChatModel"],
        "model_type": "sa2va_chat",
        "template": template,
        "llm_config": llm,
        "vision_config": {  # InternVisionConfig (configuration_intern_vit.py)
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            **{theirs: _square(getattr(v, ours)) for theirs, ours in VISION_KEYS.values()},
            "num_channels": v.num_channels,
            "qk_normalization": v.use_qk_norm,
            "norm_type": v.norm_type,
            "hidden_act": v.hidden_act,
            "dropout": 0.0,
            "drop_path_rate": 0.0,
            "attention_dropout": v.attention_dropout,
            "initializer_range": v.initializer_range,
            "initializer_factor": 1.0,
            "use_flash_attn": False,
        },
        "downsample_ratio": model.vlm.config.downsample_ratio,
        "force_image_size": image_size,
        "select_layer": -1,
        "ps_version": "v2",  # transformers' pixel_shuffle swaps height and width back, as v2 does
        # GroundedVLM sees one square tile, no thumbnail. Sa2VA's own predict_forward ignores these three and
        # tiles 1..12 + thumbnail (preparing_for_generation hard-codes it).
        "dynamic_image_size": False,
        "use_thumbnail": False,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 1,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,  # LoRA is merged into the weights
        "hidden_size": t.hidden_size,
        "tie_word_embeddings": False,  # Sa2VAChatConfig forces this; lm_head is stored either way
        "torch_dtype": str(model.text_hidden_fcs[0].weight.dtype).removeprefix("torch."),
        "dualrl": sam_record(model.spec),
    }


def _square(value):
    """transformers' [h, w] of a square -> InternViT's single size."""
    return value[0] if isinstance(value, (list, tuple)) else value


def save_sa2va(
    model: GroundedVLM,
    tokenizer,
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    template: str | None = None,
    shard_bytes: int | None = None,
) -> Path:
    """Write a Sa2VA HF directory: `model.safetensors` (or shards + `model.safetensors.index.json` when
    `shard_bytes` is given), the tokenizer and `config.json`. Refuses a non-empty directory."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    state = to_sa2va(model, dtype)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shard_bytes and shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    else:  # a bare `tokenizers.Tokenizer`
        tokenizer.save(str(directory / "tokenizer.json"))
    config = _sa2va_config(model, state[LM_NAMES[model.spec.text.arch][0]].shape[0], template)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_sa2va_state(directory: str | Path) -> dict[str, Tensor]:
    """Read a Sa2VA directory's weights (single file or sharded index), safetensors only."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for fname in sorted(set(weight_map.values())):
            shard = load_file(str(directory / fname))
            state.update({k: v for k, v in shard.items() if weight_map.get(k) == fname})
        return state
    single = directory / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor model.safetensors.index.json")
    return load_file(str(single))
