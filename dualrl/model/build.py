"""Build a GroundedVLM from a recipe's `model` section; save and load dualrl model directories.

A model directory holds `model.safetensors` (every weight the image-level model uses), the tokenizer (as
`save_pretrained` writes it) and `arch.json` (the architecture it was built with). Nothing is ever
downloaded: the tiny default is built from sizes in the recipe with a tokenizer trained offline; real
weights come from user paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Qwen2Config,
)

from dualrl.model import sam as samlib
from dualrl.model import token_rows
from dualrl.model.checkpoint_config import TEXT_KEYS, VISION_KEYS, resolve_model_spec
from dualrl.model.grounded_vlm import GroundedVLM
from dualrl.model.tokenizer import (
    MODEL_TOKENS,
    SA2VA_TOKENS,
    build_tiny_tokenizer,
    ensure_special_tokens,
    wrap_tokenizer,
)

if TYPE_CHECKING:
    from dualrl.recipe import ModelSpec


log = logging.getLogger(__name__)

ARCH_KEYS = ("vision", "text", "sam")


def _arch(spec: ModelSpec) -> dict:
    arch = {k: getattr(spec, k).model_dump(mode="json") for k in ARCH_KEYS}
    arch["sam"].pop("checkpoint", None)
    return arch


def _internvl_config(spec: ModelSpec, image_token_id: int) -> InternVLConfig:
    v, t = spec.vision, spec.text
    vision = {native: getattr(v, field) for field, (_, native) in VISION_KEYS.items()}
    vision.update(image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2)
    tokens = (v.image_size // v.patch_size) ** 2 // 4
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**vision),
        text_config=_text_config(t),
        image_token_id=image_token_id,
        downsample_ratio=0.5,
        image_seq_length=tokens,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    for part in (config, config.vision_config, config.text_config):
        part._attn_implementation = spec.attn_implementation
    return config


def _text_config(t):
    """Qwen2 for `qwen2`. InternLM2 is Llama's computation under other names (RMSNorm, SwiGLU, GQA, rotate-half
    RoPE, no biases), so `internlm2` runs as transformers' native Llama; `sa2va_layout` maps the names."""
    common = {key: getattr(t, field) for field, key in TEXT_KEYS.items()}
    common["rope_parameters"] = {"rope_theta": t.rope_theta, "rope_type": "default"}
    if t.arch == "internlm2":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    return Qwen2Config(**common)


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> GroundedVLM:
    """Random init from `spec` (seeded; skipped for the VLM when a directory's weights are loaded next), then
    the pretrained or Sa2VA directory if any, then the trainable set."""
    spec = resolve_model_spec(spec)  # the architecture a checkpoint holds (a contradiction stops here)
    if spec.pretrained:
        check_arch(spec, Path(spec.pretrained))
        tokenizer = _hf_tokenizer(Path(spec.pretrained), spec.trust_remote_code)
    elif spec.sa2va or spec.vlm:
        tokenizer = _hf_tokenizer(Path(spec.sa2va or spec.vlm).expanduser(), spec.trust_remote_code)
    else:
        tokenizer = build_tiny_tokenizer(spec.text.vocab_size)
    if len(tokenizer) > spec.text.vocab_size:
        raise ValueError(
            f"model.text.vocab_size={spec.text.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        if spec.vlm:
            vlm = _native_vlm(spec)
        else:
            image_token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
            # Weights that are loaded next need no random init (every VLM weight is: a missing one is refused).
            with _no_init() if spec.pretrained or spec.sa2va else contextlib.nullcontext():
                vlm = InternVLForConditionalGeneration(_internvl_config(spec, image_token))
            vlm.tie_weights()  # part of the skipped `init_weights`; a no-op where already tied or untied
        sam = samlib.build_sam(
            spec.sam.config, spec.sam.image_size, spec.sam.overrides, spec.sam.checkpoint, spec.sam.pe_gain
        )
        model = GroundedVLM(vlm, sam, tokenizer, spec)
    if spec.pretrained:
        load_weights(model, Path(spec.pretrained) / "model.safetensors")
    elif spec.sa2va:
        from dualrl.model.sa2va_convert import from_sa2va
        from dualrl.model.sa2va_format import load_sa2va_state

        report = from_sa2va(model, load_sa2va_state(Path(spec.sa2va).expanduser()))  # raises on a real mismatch
        log.info("model.sa2va=%s: %s", spec.sa2va, report)
    apply_trainable(model, spec.trainable)
    if spec.init_from:
        _init_trainable(model, spec)
    if spec.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model.vlm, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
            model.vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if spec.precision == "tf32" and torch.device(device).type == "cuda":
        # TF32 tensor cores for float32 products: a process-wide setting of torch, as trainers expose it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if spec.precision == "bf16":
        # Mixed precision as Sa2VA trains: what does not train is stored in bf16 (half the memory), what
        # trains stays float32 for the optimizer; the workers run forward passes under bf16 autocast.
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model.to(device)


def _no_init():
    """transformers' context that skips weight initialisation (torch's init functions and `init_weights`),
    where this transformers has it; otherwise the weights are initialised and then overwritten."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def _native_vlm(spec: ModelSpec) -> InternVLForConditionalGeneration:
    """A transformers-native InternVL from its directory (local files only; `resolve_model_spec` has matched the
    recipe to its config.json); its embeddings grow to model.text.vocab_size when dualrl added tokens."""
    vlm = InternVLForConditionalGeneration.from_pretrained(
        str(Path(spec.vlm).expanduser()),
        local_files_only=True,
        attn_implementation=spec.attn_implementation,
        dtype=torch.float32,
    )
    if vlm.get_input_embeddings().num_embeddings < spec.text.vocab_size:
        vlm.resize_token_embeddings(spec.text.vocab_size)
    return vlm


def _hf_tokenizer(directory: Path, trust_remote_code: bool = False):
    """A checkpoint's own tokenizer, from local files only, with InternVL's and Sa2VA's tokens ensured. A
    directory with a bare `tokenizer.json` (dualrl model directories before 0.4) is read as the tiny one."""
    if not (directory / "tokenizer_config.json").is_file():
        return wrap_tokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ValueError(
            f"{directory}: its tokenizer is code shipped in the directory (e.g. InternLM2's); "
            "set model.trust_remote_code=true to use it"
        ) from err
    return ensure_special_tokens(tokenizer, MODEL_TOKENS)


def _init_trainable(model: GroundedVLM, spec: ModelSpec) -> None:
    """Start from the trainable weights of an earlier run (e.g. grpo from the sft_dual default's EMA)."""
    from dualrl.checkpoint import load_trainable_weights, resolve_checkpoint

    state = load_trainable_weights(spec.init_from, spec.init_weights)
    try:
        model.load_trainable(state)
    except KeyError as err:
        raise ValueError(
            f"model.init_from={spec.init_from!r}: its trainable weights do not fit this recipe's "
            f"model (model.trainable must match the run that wrote it): {err}"
        ) from None
    log.info("trainable weights (%s) from %s", spec.init_weights, resolve_checkpoint(spec.init_from))


def check_arch(spec: ModelSpec, directory: Path) -> None:
    saved = json.loads((directory / "arch.json").read_text())
    wanted = _arch(spec)
    diffs = [
        f"model.{sec}.{k}: recipe {wanted[sec].get(k)!r} vs checkpoint {v!r}"
        for sec in ARCH_KEYS
        for k, v in saved.get(sec, {}).items()
        if wanted[sec].get(k) != v
    ]
    if diffs:
        raise ValueError(
            f"model.pretrained={str(directory)!r} was built with another architecture:\n  " + "\n  ".join(diffs)
        )


def _is_video_only(name: str) -> bool:
    return name.startswith("sam.") and name[4:].startswith(samlib.VIDEO_ONLY_PREFIXES)


def save_pretrained(model: GroundedVLM, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write a model directory (atomically: a temp dir renamed into place)."""
    if any("lora_" in n or "token_adapter" in n for n, _ in model.named_parameters()):
        raise ValueError("save_pretrained takes a model without adapters (LoRA weights are not merged here)")
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {
        n: t.detach().to("cpu", dtype).contiguous()
        for n, t in model.state_dict().items()
        if not _is_video_only(n) and t.is_floating_point()
    }
    # Tied embeddings appear under two names; safetensors stores shared memory once.
    if model.vlm.config.tie_word_embeddings:
        state.pop("vlm.lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    model.tokenizer.save_pretrained(str(tmp))  # its special tokens and, for remote-code tokenizers, its code
    (tmp / "arch.json").write_text(json.dumps(_arch(model.spec), indent=1))
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        directory.rename(old)
        tmp.rename(directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(directory)


def load_weights(model: GroundedVLM, path: Path) -> None:
    state = load_file(str(path))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _is_video_only(k) and k != "vlm.lm_head.weight"]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def _new_token_rows(model: GroundedVLM, ids: list[int] | None) -> dict[str, list[int]] | None:
    if not ids:
        return None
    return {"embed_tokens": ids} if model.vlm.config.tie_word_embeddings else {"embed_tokens": ids, "lm_head": ids}


def apply_trainable(model: GroundedVLM, spec: ModelSpec) -> None:
    """Freeze everything, then open Sa2VA's trainable set (or whatever the recipe asks)."""
    model.requires_grad_(False)
    inner = model.vlm.model
    if spec.lora:
        new_ids = model.tokenizer.convert_tokens_to_ids(list(SA2VA_TOKENS)) if spec.new_token_rows else None
        targets = "|".join(spec.lora_targets)
        config = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=rf".*language_model.*\.({targets})",
            # The new tokens' input rows and, for an untied LLM, their output rows too ([SEG] must be generated).
            trainable_token_indices=_new_token_rows(model, new_ids),
        )
        model.vlm = inject_adapter_in_model(config, model.vlm)
        token_rows.install(model.vlm)  # the same rows, without PEFT's merged copy of the matrix at every call
    elif spec.llm:
        inner.language_model.requires_grad_(True)
        model.vlm.lm_head.requires_grad_(True)
    model.vlm.model.vision_tower.requires_grad_(spec.vision)
    model.vlm.model.multi_modal_projector.requires_grad_(spec.projector)
    model.sam.image_encoder.requires_grad_(spec.sam_encoder)
    model.sam.sam_mask_decoder.requires_grad_(spec.sam_decoder)
    model.sam.sam_prompt_encoder.requires_grad_(spec.sam_decoder)
    model.sam.no_mem_embed.requires_grad_(spec.sam_decoder)
    model.text_hidden_fcs.requires_grad_(spec.seg_projection)
    log.info("%s", memory_estimate(model))


def memory_estimate(model: GroundedVLM) -> str:
    """Parameters, trainable parameters and the memory they take before any activation: the weights as
    stored, plus for the trainable ones their gradients, AdamW's two moments and the EMA copy (fp32). Not
    counted: activations, and grpo's frozen KL reference when beta > 0 (a second copy of the model)."""
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in params)
    training = sum(p.numel() * (p.element_size() + 12) for p in trainable)  # grad + exp_avg, exp_avg_sq, EMA
    gib = 1024**3
    return (
        f"parameters {n_all / 1e6:.2f} M, trainable {n_train / 1e6:.2f} M ({100 * n_train / max(1, n_all):.1f} %); "
        f"memory before activations: weights {weights / gib:.2f} GiB + grads, AdamW states and EMA "
        f"{training / gib:.2f} GiB = {(weights + training) / gib:.2f} GiB"
    )
