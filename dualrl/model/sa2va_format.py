"""Sa2VA's Hugging Face checkpoint layout <-> GroundedVLM: export (LoRA merged) and load with a key report.

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
`mllm.model.` and keep SAM2's own `.gamma`; `from_sa2va` accepts both spellings.

Loading rule (`from_sa2va`): a *real mismatch* is a shape mismatch, a missing weight the image-level model
runs, a tied `lm_head` that differs from `embed_tokens`, or an unexpected weight inside a part the model runs
(it would be dropped silently, e.g. a qkv bias the tower lacks). SAM2's video-only weights (memory attention /
encoder, object pointers, ...) may be missing, as may `lm_head` of a tied model; keys outside the parts the
model runs (including SAM2's video-only ones) are reported as unexpected and ignored.

Loading writes the base weights: into `base_layer` of LoRA-wrapped layers, and the rows of trainable-token
wrappers are re-synchronised to the loaded embedding. A model whose LoRA B weights are non-zero (trained
adapters) is refused: the loaded weights plus those adapters would not reproduce the checkpoint. A fresh
LoRA model (B = 0, as peft initialises it) is fine: that is how further training starts from a checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from safetensors.torch import load_file, save_file
from torch import Tensor

from dualrl.model.grounded_vlm import GroundedVLM
from dualrl.model.sam import VIDEO_ONLY_PREFIXES

if TYPE_CHECKING:
    from dualrl.recipe import ModelSpec


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
# Sa2VA's templates (projects/llava_sam2/hf/models/templates.py) by their instruction string.
TEMPLATES = {
    "<|user|>\n{input}<|end|>\n<|assistant|>\n": "phi3_chat",
    "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n": "qwen_chat",  # = internlm2_chat's
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
_ADAPTER_KEYS = (".lora_", ".trainable_tokens_")  # peft adapter weights: merged by to_sa2va, never loaded


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


def _arch(model: GroundedVLM) -> str:
    return model.spec.text.arch


def _is_grouped_qkv(key: str) -> bool:
    return key.endswith(".attention.wqkv.weight")


def _fuse(key: str, parts: list[Tensor], kv_heads: int) -> Tensor:
    """The GroundedVLM tensors stored under one Sa2VA name -> that tensor: InternLM2's wqkv interleaves q, k
    and v per KV head; every other fused name (InternViT's qkv) stacks them."""
    if len(parts) == 1:
        return parts[0]
    if _is_grouped_qkv(key):
        return torch.cat([p.reshape(kv_heads, -1, p.shape[-1]) for p in parts], dim=1).flatten(0, 1)
    return torch.cat(parts)


def _split(key: str, fused: Tensor, rows: list[int], kv_heads: int) -> list[Tensor]:
    """Inverse of `_fuse`: `rows` are the first dimensions of the GroundedVLM tensors."""
    if _is_grouped_qkv(key):
        grouped = fused.reshape(kv_heads, -1, fused.shape[-1])
        return [p.flatten(0, 1) for p in grouped.split([r // kv_heads for r in rows], dim=1)]
    return list(fused.split(rows))


def _normalize(key: str) -> str:
    """Training-checkpoint spelling -> HF spelling (what Sa2VA's convert_to_hf.py does)."""
    key = key.removeprefix("mllm.model.")
    if key.startswith(SAM_PREFIX):
        key = re.sub(r"\.fuser\.layers\.(\d+)\.gamma$", r".fuser.layers.\1.g_weight", key)
    return key


def _plain_tensors(model: GroundedVLM) -> dict[str, Tensor]:
    """The model's own tensors under adapter-free names (base weights of wrapped layers, adapters dropped)."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(k in name for k in _ADAPTER_KEYS):
            continue
        out[name.replace(".base_layer.", ".").replace(".token_adapter.", ".")] = tensor
    return out


def _groups(names, arch: str) -> dict[str, list[str]]:
    """Sa2VA name -> the GroundedVLM names stored in it (three for a fused qkv, in q, k, v order)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(sa2va_name(name, arch), []).append(name)
    return groups


def _adapter_weights(model: GroundedVLM) -> dict[str, Tensor]:
    """Adapter-free name -> the weight the model computes with: base + scale * B @ A for LoRA layers, the
    trained rows copied in for trainable-token wrappers (peft stores replacement rows, not differences)."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (LoraLayer, TrainableTokensLayer)) or mod.merged or mod.disable_adapters:
            continue  # not an adapter, or one whose base weight is already what the model computes with
        key = f"{name.replace('.token_adapter', '')}.weight"
        base = mod.base_layer.weight.detach()
        if isinstance(mod, TrainableTokensLayer):
            for adapter in mod.active_adapters:
                rows = torch.tensor(mod.token_indices[adapter], device=base.device)
                base = base.index_copy(0, rows, mod.trainable_tokens_delta[adapter].detach().to(base))
            out[key] = base
            continue
        if not isinstance(mod.base_layer, torch.nn.Linear) or mod.fan_in_fan_out:
            raise NotImplementedError(f"{name}: only LoRA on nn.Linear is merged here")
        merged = base.float()
        for adapter in mod.active_adapters:
            if adapter not in mod.lora_A:
                continue
            if mod.use_dora.get(adapter):
                raise NotImplementedError(f"{name}: DoRA adapters are not merged here")
            lora_a, lora_b = mod.lora_A[adapter].weight.detach(), mod.lora_B[adapter].weight.detach()
            merged = merged + mod.scaling[adapter] * (lora_b.float() @ lora_a.float())
        out[key] = merged.to(base.dtype)
    return out


def to_sa2va(model: GroundedVLM, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every weight of the model in the Sa2VA layout, LoRA and trainable token rows merged (the model is not
    modified). Tensors are fresh contiguous CPU copies (safetensors refuses shared storage)."""
    plain = {n: t.detach() for n, t in _plain_tensors(model).items()}
    plain.update(_adapter_weights(model))
    kv_heads = model.vlm.config.text_config.num_key_value_heads
    state = {}
    for key, names in _groups(plain, _arch(model)).items():
        value = _fuse(key, [plain[n] for n in names], kv_heads)
        cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
        state[key] = value.to("cpu", cast, copy=True).contiguous()
    return state


@dataclass
class LoadReport:
    """Keys of a Sa2VA state compared with a model: `missing` (the model has, the state lacks),
    `unexpected` (the state has, the model has no place for), `mismatched` (name, expected shape, shape got),
    `conflicts` (a tied lm_head that differs from embed_tokens). `real` lists what makes loading refuse."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    tied: bool = False
    arch: str = "qwen2"
    other_arch: str | None = None  # the LLM architecture the checkpoint's names are of, when not `arch`

    @property
    def embed(self) -> str:
        return LM_NAMES[self.arch][0]

    @property
    def head(self) -> str:
        return LM_NAMES[self.arch][1]

    def ignorable_missing(self, key: str) -> bool:
        return (key.startswith(SAM_PREFIX) and key[len(SAM_PREFIX) :].startswith(VIDEO_ONLY_PREFIXES)) or (
            self.tied and key == self.head
        )

    @property
    def real(self) -> list[str]:
        hint = (
            [
                f"the checkpoint's LLM is {LLM_ARCHITECTURES[self.other_arch]} (e.g. {LM_NAMES[self.other_arch][0]})"
                f": set model.text.arch={self.other_arch}"
            ]
            if self.other_arch
            else []
        )
        hint += [
            f"set model.text.vocab_size={g[0]} (the checkpoint's {n} rows)"
            for n, e, g in self.mismatched
            if n == self.embed and e[0] != g[0]
        ]
        return hint + (
            [f"shape of {n}: model {e}, checkpoint {g}" for n, e, g in self.mismatched]
            + [f"missing {k}" for k in self.missing if not self.ignorable_missing(k)]
            + [f"unexpected {k} (in a part the model runs)" for k in self.unexpected if k.startswith(USED_PREFIXES)]
            + [f"{k} differs from {self.embed} but the model ties them" for k in self.conflicts]
        )

    def __str__(self) -> str:
        def few(items, n=8):
            items = [str(i) for i in items]
            return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")

        lines = [
            f"Sa2VA load: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched, {len(self.conflicts)} conflicts"
        ]
        if self.real:
            lines.append("  real mismatches: " + few(self.real))
        ignored_missing = [k for k in self.missing if self.ignorable_missing(k)]
        ignored_unexpected = [k for k in self.unexpected if not k.startswith(USED_PREFIXES)]
        if ignored_missing:
            lines.append("  missing, not needed (video-only SAM2 / tied lm_head): " + few(ignored_missing))
        if ignored_unexpected:
            lines.append("  unexpected, ignored: " + few(ignored_unexpected))
        return "\n".join(lines)


def from_sa2va(model: GroundedVLM, state: dict[str, Tensor], strict: bool = True) -> LoadReport:
    """Load a Sa2VA-layout state (HF or training-checkpoint spelling) into the model's base weights.
    Raises ValueError with the report on a real mismatch (see the module docstring) unless `strict=False`,
    which loads whatever fits. Nothing is written when it raises."""
    trained = [
        n for n, p in model.named_parameters() if ("lora_B" in n or "lora_embedding_B" in n) and bool(p.detach().any())
    ]
    if trained:
        raise ValueError(
            f"the model carries trained LoRA adapters ({trained[0]}, ...): loading base weights "
            "under them would not reproduce the checkpoint; load into a model without LoRA or with "
            "fresh adapters"
        )
    state = {_normalize(k): v for k, v in state.items()}
    targets = _plain_tensors(model)
    arch = _arch(model)
    kv_heads = model.vlm.config.text_config.num_key_value_heads
    groups = _groups(targets, arch)
    embed_key, head_key = LM_NAMES[arch]
    embed, head = groups[embed_key][0], groups.get(head_key, [None])[0]
    report = LoadReport(tied=head is not None and targets[head].data_ptr() == targets[embed].data_ptr(), arch=arch)
    report.other_arch = next((a for a, (e, _) in LM_NAMES.items() if a != arch and e in state), None)
    report.unexpected = [k for k in state if k not in groups]
    report.missing = [k for k in groups if k not in state]
    for key, names in groups.items():
        if key in state:
            want = (sum(targets[n].shape[0] for n in names), *targets[names[0]].shape[1:])
            if tuple(state[key].shape) != want:
                report.mismatched.append((key, want, tuple(state[key].shape)))
    bad = {k for k, *_ in report.mismatched}
    comparable = report.tied and head_key in state and embed_key in state and not bad & {head_key, embed_key}
    if comparable and not torch.equal(state[head_key].to(state[embed_key].dtype), state[embed_key]):
        report.conflicts.append(head_key)
    if strict and report.real:
        raise ValueError(str(report))
    with torch.no_grad():
        for key, names in groups.items():
            if key not in state or key in bad or (report.tied and key == head_key and embed_key in state):
                continue  # a tied lm_head is embed_tokens, loaded under that name
            parts = _split(key, state[key], [targets[n].shape[0] for n in names], kv_heads)
            for name, part in zip(names, parts):
                targets[name].copy_(part)
        for mod in model.modules():  # trainable-token rows start from the loaded embedding, as peft's do
            if isinstance(mod, TrainableTokensLayer) and not mod.tied_adapter:
                for a, rows in mod.token_indices.items():
                    loaded = mod.base_layer.weight[torch.tensor(rows, device=mod.base_layer.weight.device)]
                    mod.trainable_tokens_delta[a].copy_(loaded)
                    mod.trainable_tokens_original[a] = loaded.detach().clone()
    model._features = None  # drop cached image features of the old weights
    return report


# ------------------------------------------------------------------------------------------- files
def _llm_config(t, arch: str, vocab_size: int) -> dict:
    """`llm_config` of Sa2VAChatConfig: a transformers Qwen2Config, or the fields of InternLM2's own config
    class (configuration_internlm2.py, remote code in InternVL/Sa2VA directories)."""
    rope_theta = (t.rope_parameters or {}).get("rope_theta", 10000.0)
    if arch == "internlm2":
        return {
            "architectures": [LLM_ARCHITECTURES[arch]],
            "model_type": "internlm2",
            "vocab_size": vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": rope_theta,
            "rope_scaling": None,
            "bias": False,
            "tie_word_embeddings": t.tie_word_embeddings,
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
    llm = _llm_config(t, _arch(model), vocab_size)
    image_size, patch_size = v.image_size[0], v.patch_size[0]
    template = template or TEMPLATES.get(model.spec.prompts.chat)
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
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": v.num_channels,
            "qkv_bias": v.attention_bias,
            "qk_normalization": v.use_qk_norm,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
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
    }


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
    config = _sa2va_config(model, state[LM_NAMES[_arch(model)][0]].shape[0], template)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


# (recipe field, Sa2VA config field) pairs checked by `check_sa2va_config`
_CONFIG_FIELDS = {
    "text": (
        ("hidden_size", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("kv_heads", "num_key_value_heads"),
        ("intermediate_size", "intermediate_size"),
        ("rope_theta", "rope_theta"),
        ("rms_norm_eps", "rms_norm_eps"),
    ),
    "vision": (
        ("hidden_size", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
        ("image_size", "image_size"),
        ("patch_size", "patch_size"),
        ("qkv_bias", "qkv_bias"),
        ("layer_norm_eps", "layer_norm_eps"),
    ),
}


def config_differences(spec: ModelSpec, config: dict) -> list[str]:
    """What a recipe's `model.text` / `model.vision` say against a Sa2VA `config.json`, by recipe key. Fields
    the config lacks are not compared; embedding rows are checked on the weights (the config's vocab_size can
    predate the added tokens)."""
    llm, vision = dict(config.get("llm_config") or {}), dict(config.get("vision_config") or {})
    if "rope_theta" not in llm and isinstance(llm.get("rope_parameters"), dict):
        llm["rope_theta"] = llm["rope_parameters"].get("rope_theta")
    diffs = []
    architecture = (llm.get("architectures") or [None])[0]
    known = {v: k for k, v in LLM_ARCHITECTURES.items()}
    if architecture is not None and architecture not in known:
        diffs.append(
            f"model.text.arch: the checkpoint's LLM is {architecture}; dualrl runs "
            + " and ".join(LLM_ARCHITECTURES.values())
        )
    elif architecture is not None and known[architecture] != spec.text.arch:
        diffs.append(
            f"model.text.arch: recipe {spec.text.arch!r} vs checkpoint {known[architecture]!r} ({architecture})"
        )
    for section, fields in (("text", llm), ("vision", vision)):
        ours = getattr(spec, section)
        for name, key in _CONFIG_FIELDS[section]:
            if fields.get(key) is not None and fields[key] != getattr(ours, name):
                diffs.append(f"model.{section}.{name}: recipe {getattr(ours, name)!r} vs checkpoint {fields[key]!r}")
    return diffs


def check_sa2va_config(spec, directory: Path) -> None:
    """Refuse a recipe whose architecture differs from the Sa2VA directory's `config.json`, naming the keys."""
    path = directory / "config.json"
    if not path.is_file():
        return  # the weights are still checked key by key on load
    diffs = config_differences(spec, json.loads(path.read_text()))
    if diffs:
        raise ValueError(
            f"model.sa2va={str(directory)!r}: the recipe describes another architecture:\n  " + "\n  ".join(diffs)
        )


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
