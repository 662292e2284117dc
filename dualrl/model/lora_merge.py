"""LoRA folded into copies of the adapted weights, for decoding (see `MergedLora`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def is_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer: a base layer wrapped with adapters."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def foldable(layer: nn.Module) -> bool:
    """Whether a LoRA layer can be folded into one weight: plain LoRA on a linear layer, one active adapter,
    adapters on and not merged into the base, no LoRA bias or variant (DoRA)."""
    if not (isinstance(layer.base_layer, nn.Linear) and len(layer.active_adapters) == 1) or layer.disable_adapters:
        return False
    name = layer.active_adapters[0]
    return (
        name in layer.lora_A
        and not layer.merged
        and not getattr(layer, "fan_in_fan_out", False)
        and not getattr(layer, "lora_variant", {})
        and not getattr(layer, "use_dora", {}).get(name, False)
        and not getattr(layer, "lora_bias", {}).get(name, False)
    )


def fold_into(layer: nn.Module, out: Tensor) -> None:
    """W + s B A of a foldable LoRA layer written into `out`: one fused product, B and A in W's dtype (as bf16
    autocast computes the adapter in training), accumulated in float32 and rounded once."""
    name = layer.active_adapters[0]
    base = layer.base_layer.weight
    lora_b = layer.lora_B[name].weight.to(base.dtype)
    lora_a = layer.lora_A[name].weight.to(base.dtype)
    torch.addmm(base, lora_b, lora_a, alpha=layer.scaling[name], out=out)


class MergedLora:
    """LoRA folded into a copy of each adapted weight for decoding: W + B A s, in the base weight's dtype.

    An unmerged LoRA layer costs a token step several small kernels on top of its base product (input cast,
    weight casts, two thin products, scale, add): at Sa2VA's LoRA on every projection of every layer that is
    thousands of launches a step. The merged copies (refreshed once per decoder call, in place, so captured
    graphs read the new values) make each adapted layer one product; the model's own weights are never touched.
    Costs a copy of the adapted weights in memory (`model.decode_merge_lora: false` turns it off). Layers this
    cannot fold (several active adapters, DoRA and other variants) leave the whole model unmerged. Layers in
    `skip` are folded elsewhere (the fused projections of `fused_projections.py`)."""

    def __init__(self, lm: nn.Module, skip: Iterable[nn.Module] = ()):
        self.lm = lm
        skipped = {id(m) for m in skip}
        self.layers = [m for m in lm.modules() if is_lora(m) and id(m) not in skipped]
        self.weights: list[nn.Parameter] = []

    def usable(self) -> bool:
        """Whether this call can decode with merged copies: every layer foldable and the model in eval mode
        (folding skips LoRA dropout, which only training applies)."""
        return bool(self.layers) and not self.lm.training and all(foldable(m) for m in self.layers)

    def refresh(self) -> bool:
        """The merged copies from the current weights; True when a copy had to be allocated anew (graphs captured
        before then read the old one)."""
        allocated = False
        with torch.no_grad():
            for k, layer in enumerate(self.layers):
                base = layer.base_layer.weight
                held = self.weights[k] if k < len(self.weights) else None
                if held is None or held.shape != base.shape or held.dtype != base.dtype:
                    held = nn.Parameter(torch.empty_like(base), requires_grad=False)
                    self.weights[k : k + 1] = [held]
                    allocated = True
                fold_into(layer, held.data)
        return allocated

    @contextlib.contextmanager
    def active(self):
        """The adapted layers compute with their merged copies (adapters off) for the block's duration."""
        saved = [(layer.base_layer._parameters["weight"], layer._disable_adapters) for layer in self.layers]
        try:
            for layer, weight in zip(self.layers, self.weights):
                layer.base_layer._parameters["weight"] = weight
                layer._disable_adapters = True
            yield
        finally:
            for layer, (weight, disabled) in zip(self.layers, saved):
                layer.base_layer._parameters["weight"] = weight
                layer._disable_adapters = disabled
