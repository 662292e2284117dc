"""The checkpoint is the source of truth for its architecture: a recipe states only what it changes.

With `model.sa2va`, `model.vlm` or `model.sam.checkpoint`, what the checkpoint says about the model it holds
(`checkpoint_facts`: config.json and its LLM / vision sub-configs, the chat `template`, the embedding rows and
SAM2 trunk in the weights, the SAM2 settings) fills every architecture key the recipe leaves out
(`resolve_model_spec`). A key the recipe sets to another value stops the run before any weight is read, with a
RecipeError naming the recipe key, both values and which checkpoint said so. "Set" means set in the recipe file,
a file it extends or an override (pydantic's `model_fields_set`); a value equal to the checkpoint's is fine.

Sources, later over earlier where both speak (their weights load in this order):
- `model.sam.checkpoint` (an official SAM2 `.pt` or a `.safetensors` file): a standard trunk (hiera t / s / b+ /
  l, SAM2 or SAM2.1, told apart by its weights) implies its package config, no overrides, 1024 px input and no
  positional-encoding gain, as SAM2 was trained. A non-standard trunk implies nothing: the recipe describes it.
- `model.vlm` (a transformers-native InternVL directory): `model.vision.*` and `model.text.*` from config.json;
  `model.text.vocab_size` may exceed the checkpoint's (the embeddings grow to it).
- `model.sa2va` (a Sa2VA HF directory): `model.text.*` from `llm_config` (`text.arch` from its architecture,
  `text.vocab_size` from the embedding rows in the weights), `model.vision.*` from `vision_config`,
  `model.prompts.chat` from `template` (and `prompts.answer_end`, when the recipe leaves it out, from the
  template's turn end), and SAM2: as dualrl wrote it (`config.json`'s `dualrl` entry, see `sam_record`), else
  Sa2VA's own use of SAM2: the trunk in the weights, 1024 px, no gain, three masks and the best kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from dualrl.model.sa2va_layout import LLM_ARCHITECTURES, LM_NAMES, SAM_PREFIX, TEMPLATES, normalize

if TYPE_CHECKING:
    from dualrl.recipe import ModelSpec


# The one table of architecture keys. model.vision field -> (Sa2VA InternVisionConfig key, transformers
# InternVLVisionConfig key); transformers stores image_size and patch_size as [h, w].
VISION_KEYS = {
    "hidden_size": ("hidden_size", "hidden_size"),
    "layers": ("num_hidden_layers", "num_hidden_layers"),
    "heads": ("num_attention_heads", "num_attention_heads"),
    "intermediate_size": ("intermediate_size", "intermediate_size"),
    "image_size": ("image_size", "image_size"),
    "patch_size": ("patch_size", "patch_size"),
    "qkv_bias": ("qkv_bias", "attention_bias"),
    "layer_norm_eps": ("layer_norm_eps", "layer_norm_eps"),
}
# model.text field -> LLM config key (Sa2VA's llm_config and transformers' text_config alike). rope_theta is
# `rope_theta`, or `rope_parameters.rope_theta` from transformers 5 on (`_rope_theta`).
TEXT_KEYS = {
    "hidden_size": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
}
# transformers' text model_type -> model.text.arch (InternLM2 runs as transformers' Llama)
NATIVE_TEXT_ARCH = {"qwen2": "qwen2", "llama": "internlm2"}
# Standard SAM2 trunks: (embed_dim, blocks) -> config size
_HIERA = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
SAM_INPUT = 1024  # the input size every released SAM2 (and Sa2VA's) was trained at


@dataclass(frozen=True)
class Fact:
    """One architecture value a checkpoint states. `check`: "equal" (a different recipe value is refused),
    "at_least" (a smaller one is), "fill" (only taken where the recipe leaves the key out), "required" (the
    checkpoint names something dualrl cannot translate: the recipe must set the key)."""

    value: Any
    source: str
    check: str = "equal"
    hint: str = ""

    def contradicts(self, ours: Any) -> bool:
        if self.check in ("fill", "required"):
            return False
        if self.check == "at_least":
            return ours < self.value
        return ours != self.value


def resolve_model_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` with every architecture key it leaves out taken from its checkpoint; raises RecipeError naming each
    key the recipe sets against the checkpoint. Without a checkpoint, or when nothing is missing, `spec` itself."""
    facts = checkpoint_facts(spec)
    wrong = [
        f"model.{key}: recipe {_get(spec, key)!r} vs checkpoint {fact.value!r} ({fact.source}){fact.hint}"
        for key, fact in facts.items()
        if _is_set(spec, key) and fact.contradicts(_get(spec, key))
    ]
    if wrong:
        raise _refuse(
            "the recipe contradicts its checkpoint (a recipe states only what it changes: leave a key out to "
            "take the checkpoint's value):\n  " + "\n  ".join(wrong)
        )
    missing = {key: fact for key, fact in facts.items() if not _is_set(spec, key)}
    unknown = [
        f"model.{key}: {fact.source}; set it in the recipe" for key, fact in missing.items() if fact.check == "required"
    ]
    if unknown:
        raise _refuse("the checkpoint leaves keys to the recipe:\n  " + "\n  ".join(unknown))
    if not missing:
        return spec
    out = spec.model_copy(deep=True)
    for key, fact in missing.items():
        section, _, name = key.rpartition(".")
        try:
            setattr(_get(out, section) if section else out, name, fact.value)
        except ValidationError as err:
            raise _refuse(f"model.{key}: {fact.source} gives {fact.value!r}, not a valid value: {err}") from None
    return out


def checkpoint_facts(spec: ModelSpec) -> dict[str, Fact]:
    """Architecture key (below `model.`) -> what the recipe's checkpoints state about it."""
    facts: dict[str, Fact] = {}
    if spec.sam.checkpoint:
        facts.update(_sam_checkpoint_facts(Path(spec.sam.checkpoint)))
    if spec.vlm:
        facts.update(_native_facts(Path(spec.vlm).expanduser()))
    if spec.sa2va:
        facts.update(_sa2va_facts(Path(spec.sa2va).expanduser()))
    return facts


def _refuse(message: str) -> Exception:
    from dualrl.recipe import RecipeError  # here: the recipe loader may call this module

    return RecipeError(message)


def _is_set(spec: ModelSpec, key: str) -> bool:
    section, _, name = key.rpartition(".")
    return name in (_get(spec, section) if section else spec).model_fields_set


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------------------------ Sa2VA
def _sa2va_facts(directory: Path) -> dict[str, Fact]:
    src = f"model.sa2va={str(directory)!r}"
    path = directory / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    shapes = weight_shapes(directory)
    llm = dict(config.get("llm_config") or {})
    arch = _sa2va_arch(llm, shapes, src)
    facts = {"text.arch": Fact(arch, src)} if arch else {}
    facts.update(_text_facts(llm, src, vocab=False))
    embed = shapes.get(LM_NAMES[arch or "qwen2"][0])
    if embed:
        facts["text.vocab_size"] = Fact(embed[0], src + ", its embedding rows")
    vision = config.get("vision_config") or {}
    facts.update(
        {f"vision.{f}": Fact(vision[k], src) for f, (k, _) in VISION_KEYS.items() if vision.get(k) is not None}
    )
    facts.update(_template_facts(config.get("template"), src))
    facts.update(_sa2va_sam_facts(config.get("dualrl"), shapes, src))
    return facts


def _sa2va_arch(llm: dict, shapes: dict[str, list[int]], src: str) -> str | None:
    """model.text.arch from llm_config's architecture, else from the embedding's name in the weights."""
    architecture = (llm.get("architectures") or [None])[0]
    known = {v: k for k, v in LLM_ARCHITECTURES.items()}
    if architecture is None:
        return next((a for a, (embed, _) in LM_NAMES.items() if embed in shapes), None)
    if architecture not in known:
        raise _refuse(
            f"model.text.arch: the checkpoint's LLM is {architecture} ({src}); dualrl runs "
            + " and ".join(LLM_ARCHITECTURES.values())
        )
    return known[architecture]


def _template_facts(template: str | None, src: str) -> dict[str, Fact]:
    if template is None:
        return {}
    if template not in TEMPLATES:  # the recipe must then write its turns
        why = f"{src}, template {template!r}, not one of {', '.join(TEMPLATES)}"
        return {"prompts.chat": Fact(None, why, check="required")}
    chat, end = TEMPLATES[template]
    why = f"{src}, template {template}"
    return {"prompts.chat": Fact(chat, why), "prompts.answer_end": Fact(end, why, check="fill")}


def _sa2va_sam_facts(record: dict | None, shapes: dict[str, list[int]], src: str) -> dict[str, Fact]:
    """SAM2 as dualrl recorded it when it wrote the directory, else as Sa2VA runs it (three masks, best kept)."""
    if record:
        flat = {f"sam.{k}": v for k, v in record.get("sam", {}).items()}
        if "multimask" in record:
            flat["multimask"] = record["multimask"]
        return {key: Fact(value, src) for key, value in flat.items()}
    facts = _standard_sam_facts(shapes, SAM_PREFIX, src + ", Sa2VA's SAM2")
    if facts:
        facts["multimask"] = Fact(True, src + ": Sa2VA decodes three masks and keeps the best")
    return facts


def sam_record(spec: ModelSpec) -> dict[str, Any]:
    """What a Sa2VA directory written by dualrl records of its SAM2 (config.json's `dualrl` entry): the settings
    its weights were trained with, which the weights alone do not show."""
    sam = spec.sam.model_dump(mode="json", exclude={"checkpoint"})
    return {"sam": sam, "multimask": spec.multimask}


# ----------------------------------------------------------------------------------- native and SAM2
def _native_facts(directory: Path) -> dict[str, Fact]:
    src = f"model.vlm={str(directory)!r}"
    config = json.loads((directory / "config.json").read_text())
    text = dict(config.get("text_config") or {})
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings"))
    facts = _text_facts(text, src, vocab=True)
    if text.get("model_type") in NATIVE_TEXT_ARCH:
        facts["text.arch"] = Fact(NATIVE_TEXT_ARCH[text["model_type"]], f"{src}, a {text['model_type']} model")
    vision = config.get("vision_config") or {}
    for field, (_, key) in VISION_KEYS.items():
        value = vision.get(key)
        if isinstance(value, list) and len(set(value)) == 1:  # [h, w] of a square
            value = value[0]
        if value is not None:
            facts[f"vision.{field}"] = Fact(value, src)
    return facts


def _text_facts(llm: dict, src: str, vocab: bool) -> dict[str, Fact]:
    """model.text.* from an LLM config. `vocab`: its vocab_size counts (a recipe may grow it); a Sa2VA config's
    may predate the added tokens, so there the weights' rows count instead."""
    facts = {
        f"text.{field}": Fact(llm[key], src)
        for field, key in TEXT_KEYS.items()
        if llm.get(key) is not None and field != "vocab_size"
    }
    if vocab and llm.get("vocab_size") is not None:
        facts["text.vocab_size"] = Fact(llm["vocab_size"], src, check="at_least")
    theta = _rope_theta(llm)
    if theta is not None:
        facts["text.rope_theta"] = Fact(float(theta), src)
    tied = facts.get("text.tie_word_embeddings")
    if tied is not None:
        what = "ties lm_head to" if tied.value else "keeps lm_head apart from"
        facts["text.tie_word_embeddings"] = Fact(
            tied.value,
            src,
            hint=f"; its LLM {what} the input embedding: set model.text.tie_word_embeddings="
            f"{str(tied.value).lower()} or leave the key out",
        )
    return facts


def _rope_theta(llm: dict) -> float | None:
    if llm.get("rope_theta") is not None:
        return llm["rope_theta"]
    return (llm.get("rope_parameters") or {}).get("rope_theta")


def _sam_checkpoint_facts(path: Path) -> dict[str, Fact]:
    if path.suffix == ".safetensors":
        shapes = _safetensors_shapes(path)
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        shapes = {k: list(v.shape) for k, v in state.items()}
    return _standard_sam_facts(shapes, "", f"model.sam.checkpoint={str(path)!r}")


def _standard_sam_facts(shapes: dict[str, list[int]], prefix: str, src: str) -> dict[str, Fact]:
    """A released SAM2 trunk in the weights -> its package config, no overrides, SAM2's input size, no gain."""
    config = standard_sam_config(shapes, prefix)
    if config is None:
        return {}
    why = f"{src}: {config.rsplit('/', 1)[-1]}"
    values = {"sam.config": config, "sam.overrides": [], "sam.image_size": SAM_INPUT, "sam.pe_gain": 1.0}
    return {key: Fact(value, why) for key, value in values.items()}


def standard_sam_config(shapes: dict[str, list[int]], prefix: str = "") -> str | None:
    """The `sam2` package config of a released trunk (hiera t / s / b+ / l; SAM2.1 has `no_obj_embed_spatial`),
    from weight names and shapes; None for any other trunk (e.g. dualrl's nano one)."""
    patch = shapes.get(prefix + "image_encoder.trunk.patch_embed.proj.weight")
    if patch is None or prefix + "sam_mask_decoder.conv_s0.weight" not in shapes:
        return None
    block = re.compile(re.escape(prefix) + r"image_encoder\.trunk\.blocks\.(\d+)\.")
    blocks = {m.group(1) for m in map(block.match, shapes) if m}
    size = _HIERA.get((patch[0], len(blocks)))
    if size is None:
        return None
    version = "sam2.1" if prefix + "no_obj_embed_spatial" in shapes else "sam2"
    return f"configs/{version}/{version}_hiera_{size}.yaml"


def weight_shapes(directory: Path) -> dict[str, list[int]]:
    """Name (HF spelling) -> shape of every tensor in a directory's safetensors files, from their headers alone."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"] if (directory / "model.safetensors").is_file() else []
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update({normalize(k): v for k, v in _safetensors_shapes(directory / name).items()})
    return shapes


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """A safetensors file's header: 8 bytes of little-endian length, then JSON (name -> dtype, shape, offsets)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
