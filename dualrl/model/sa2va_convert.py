"""GroundedVLM <-> a state in Sa2VA's layout (`sa2va_layout`): export with LoRA merged, load with a key report.

Loading rule (`from_sa2va`): a *real mismatch* is a shape mismatch, a missing weight the image-level model
runs, a tied `lm_head` that differs from `embed_tokens`, or an unexpected weight inside a part the model runs
(it would be dropped silently, e.g. a qkv bias the tower lacks). SAM2's video-only weights (memory attention /
encoder, object pointers, ...) may be missing, as may `lm_head` of a tied model; keys outside the parts the
model runs (including SAM2's video-only ones) are reported as unexpected and ignored. Both spellings load: the
HF one and the training checkpoints' (`sa2va_layout.normalize`).

Loading writes the base weights: into `base_layer` of LoRA-wrapped layers, and the rows of trainable-token
wrappers are re-synchronised to the loaded embedding. A model whose LoRA B weights are non-zero (trained
adapters) is refused: the loaded weights plus those adapters would not reproduce the checkpoint. A fresh
LoRA model (B = 0, as peft initialises it) is fine: that is how further training starts from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import Tensor

from dualrl.model.grounded_vlm import GroundedVLM
from dualrl.model.sa2va_layout import (
    LLM_ARCHITECTURES,
    LM_NAMES,
    SAM_PREFIX,
    USED_PREFIXES,
    groups,
    normalize,
)
from dualrl.model.sam import VIDEO_ONLY_PREFIXES

_ADAPTER_KEYS = (".lora_", ".trainable_tokens_")  # peft adapter weights: merged by to_sa2va, never loaded


def _is_grouped_qkv(key: str) -> bool:
    return key.endswith(".attention.wqkv.weight")


def fuse(key: str, parts: list[Tensor], kv_heads: int) -> Tensor:
    """The GroundedVLM tensors stored under one Sa2VA name -> that tensor: InternLM2's wqkv interleaves q, k
    and v per KV head; every other fused name (InternViT's qkv) stacks them."""
    if len(parts) == 1:
        return parts[0]
    if _is_grouped_qkv(key):
        return torch.cat([p.reshape(kv_heads, -1, p.shape[-1]) for p in parts], dim=1).flatten(0, 1)
    return torch.cat(parts)


def split(key: str, fused: Tensor, rows: list[int], kv_heads: int) -> list[Tensor]:
    """Inverse of `fuse`: `rows` are the first dimensions of the GroundedVLM tensors."""
    if _is_grouped_qkv(key):
        grouped = fused.reshape(kv_heads, -1, fused.shape[-1])
        return [p.flatten(0, 1) for p in grouped.split([r // kv_heads for r in rows], dim=1)]
    return list(fused.split(rows))


def _arch(model: GroundedVLM) -> str:
    return model.spec.text.arch


def _plain_tensors(model: GroundedVLM) -> dict[str, Tensor]:
    """The model's own tensors under adapter-free names (base weights of wrapped layers, adapters dropped)."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(k in name for k in _ADAPTER_KEYS):
            continue
        out[name.replace(".base_layer.", ".").replace(".token_adapter.", ".")] = tensor
    return out


def _adapter_weights(model: GroundedVLM) -> dict[str, Tensor]:
    """Adapter-free name -> the weight the model computes with: base + scale * B @ A for LoRA layers, the
    trained rows copied in for trainable-token wrappers (peft stores replacement rows, not differences)."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (LoraLayer, TrainableTokensLayer)) or mod.merged or mod.disable_adapters:
            continue  # not an adapter, or one whose base weight is already what the model computes with
        key = f"{name.replace('.token_adapter', '')}.weight"
        if isinstance(mod, TrainableTokensLayer):
            out[key] = mod.get_merged_weights(mod.active_adapters).detach()
            continue
        base = mod.base_layer.weight.detach()
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
    for key, names in groups(plain, _arch(model)).items():
        value = fuse(key, [plain[n] for n in names], kv_heads)
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
    state = {normalize(k): v for k, v in state.items()}
    targets = _plain_tensors(model)
    arch = _arch(model)
    kv_heads = model.vlm.config.text_config.num_key_value_heads
    names_of = groups(targets, arch)
    embed_key, head_key = LM_NAMES[arch]
    embed, head = names_of[embed_key][0], names_of.get(head_key, [None])[0]
    report = LoadReport(tied=head is not None and targets[head].data_ptr() == targets[embed].data_ptr(), arch=arch)
    report.other_arch = next((a for a, (e, _) in LM_NAMES.items() if a != arch and e in state), None)
    report.unexpected = [k for k in state if k not in names_of]
    report.missing = [k for k in names_of if k not in state]
    for key, names in names_of.items():
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
        for key, names in names_of.items():
            if key not in state or key in bad or (report.tied and key == head_key and embed_key in state):
                continue  # a tied lm_head is embed_tokens, loaded under that name
            parts = split(key, state[key], [targets[n].shape[0] for n in names], kv_heads)
            for name, part in zip(names, parts):
                targets[name].copy_(part)
        for mod in model.modules():  # trainable-token rows start from the loaded embedding, as peft's do
            if isinstance(mod, TrainableTokensLayer) and not mod.tied_adapter:
                for a, rows in mod.token_indices.items():
                    loaded = mod.base_layer.weight[torch.tensor(rows, device=mod.base_layer.weight.device)]
                    mod.trainable_tokens_delta[a].copy_(loaded)
                    mod.trainable_tokens_original[a] = loaded.detach().clone()
    model.encodings.clear()  # drop cached image features of the old weights
    return report
