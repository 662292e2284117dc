"""Sibling projections computed as one product while decoding (see `FusedProjections`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualrl.model.lora_merge import fold_into, foldable, is_lora

# Projections of one module that read the same input, in the order transformers' decoder layers call them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def base_linear(module: nn.Module) -> nn.Linear | None:
    """The linear layer a projection computes with (a LoRA layer's base), or None for anything else."""
    base = module.base_layer if is_lora(module) else module
    return base if type(base) is nn.Linear else None


class FusedGroup(nn.Module):
    """One group's fused weight [sum of outputs, input] and bias, and the members' outputs for the input it last saw.

    The first member called with a new input computes every member's output (`outputs`); the others, called with
    that same input, take their part of it. A member called with another input computes the outputs for that input,
    so the parts are right whatever order the module calls its projections in; the kept outputs are dropped once
    every member has taken its part, so nothing outlives the module's forward pass."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, sizes: list[int]):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.sizes = sizes
        self.input: Tensor | None = None
        self.parts: Sequence[Tensor] | None = None
        self.taken = 0

    def outputs(self, x: Tensor) -> Sequence[Tensor]:
        """Every member's output for input `x`: here its part of one product over the fused weight."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def part(self, x: Tensor, k: int) -> Tensor:
        if self.parts is None or x is not self.input:
            self.input, self.taken = x, 0
            self.parts = self.outputs(x)
        out = self.parts[k]
        self.taken += 1
        if self.taken == len(self.sizes):
            self.input = self.parts = None
        return out

    def forget(self) -> None:
        self.input = self.parts = None


class GroupMember(nn.Module):
    """Stands in for one projection of a group (`FusedGroup`) while the group computes."""

    def __init__(self, group: FusedGroup, k: int):
        super().__init__()
        self.group, self.k = group, k

    def forward(self, x: Tensor) -> Tensor:
        return self.group.part(x, self.k)


class FusedProjections:
    """A decoder layer's query/key/value projections, and its MLP's gate/up projections, as one product each.

    At a decode step every projection is a matrix-vector product bound by reading its weight, and the small
    ones (key and value under grouped-query attention) take several times their read time in launch and tail
    cost. One product over the concatenated weights reads the same bytes in one kernel. The fused weights are
    copies (LoRA folded in, as `MergedLora` folds it), refreshed in place once per decoder call, so captured
    graphs read the current values; the model's own modules are put back after every call. Groups are found by
    name (`SIBLINGS`): modules with all of a group's projections as plain linear layers of one dtype and device,
    or foldable LoRA layers over them."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.groups: list[tuple[nn.Module, tuple[str, ...]]] = []
        for parent in lm.modules():
            for names in SIBLINGS:
                members = [getattr(parent, n, None) for n in names]
                bases = [base_linear(m) if isinstance(m, nn.Module) else None for m in members]
                if all(b is not None for b in bases) and _alike(bases):
                    self.groups.append((parent, names))
        self.fused: list[FusedGroup] = []
        self.members: list[list[GroupMember]] = []

    def lora_layers(self) -> list[nn.Module]:
        """The LoRA layers folded into the fused weights (the caller's `MergedLora` leaves them out)."""
        return [m for parent, names in self.groups for n in names if is_lora(m := getattr(parent, n))]

    def usable(self) -> bool:
        """Whether this call can decode fused: groups found, and every LoRA member foldable in eval mode."""
        lora = self.lora_layers()
        return bool(self.groups) and not (lora and self.lm.training) and all(foldable(m) for m in lora)

    def refresh(self) -> bool:
        """The fused weights from the current ones; True when one had to be allocated anew (graphs captured
        before then read the old one)."""
        allocated = False
        with torch.no_grad():
            for k, (parent, names) in enumerate(self.groups):
                members = [getattr(parent, n) for n in names]
                bases = [base_linear(m) for m in members]
                sizes = [b.out_features for b in bases]
                held = self.fused[k] if k < len(self.fused) else None
                ref = bases[0].weight
                if held is None or held.weight.shape != (sum(sizes), ref.shape[1]) or held.weight.dtype != ref.dtype:
                    held = self._allocate(k, bases, sizes)
                    allocated = True
                rows = held.weight.split(sizes)
                for member, base, out in zip(members, bases, rows):
                    if is_lora(member):
                        fold_into(member, out)
                    else:
                        out.copy_(base.weight)
                if held.bias is not None:
                    for base, out in zip(bases, held.bias.split(sizes)):
                        out.copy_(base.bias) if base.bias is not None else out.zero_()
        return allocated

    def _allocate(self, k: int, bases: list[nn.Linear], sizes: list[int]) -> FusedGroup:
        ref = bases[0].weight
        weight = ref.new_empty(sum(sizes), ref.shape[1])
        bias = ref.new_zeros(sum(sizes)) if any(b.bias is not None for b in bases) else None
        fused = FusedGroup(weight, bias, sizes)
        members = [GroupMember(fused, i) for i in range(len(sizes))]
        self.fused[k : k + 1], self.members[k : k + 1] = [fused], [members]
        return fused

    def active(self):
        """The grouped projections compute from the fused weights for the block's duration."""
        return members_in_place(self.groups, self.members, self.fused)


@contextlib.contextmanager
def members_in_place(
    places: list[tuple[nn.Module, tuple[str, ...]]], members: list[list[GroupMember]], groups: list[FusedGroup]
) -> Iterator[None]:
    """Each place's projections (`parent.<name>` for its names) replaced by its group's members for the block's
    duration; the model's own modules put back after it, and the groups' kept outputs dropped."""
    saved = [[parent._modules[n] for n in names] for parent, names in places]
    try:
        for (parent, names), own in zip(places, members):
            for name, member in zip(names, own):
                parent._modules[name] = member
        yield
    finally:
        for (parent, names), modules in zip(places, saved):
            for name, module in zip(names, modules):
                parent._modules[name] = module
        for group in groups:
            group.forget()


def _alike(bases: list[nn.Linear]) -> bool:
    """Linear layers that can share one product: the same input size, dtype and device."""
    ref = bases[0].weight
    return all(
        b.in_features == bases[0].in_features and b.weight.dtype == ref.dtype and b.weight.device == ref.device
        for b in bases
    )
