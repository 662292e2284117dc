"""Sibling LoRA projections computed together in the learner's updates (`model.train_fuse_projections`).

With LoRA on every projection of a decoder layer, its forward pass runs 21 matrix products (7 frozen base
products, 7 A, 7 B) and its backward pass 35 (the bases' input gradients, two per adapter product). At the 4B size
the update is bound by how fast the host launches them, not by the GPU (docs/speed.md, "Where the GPU waits").
The query, key and value projections read the same input, as do the MLP's gate and up projections. In each such
group here:

- the frozen base products are one product over a concatenated copy of the base weights (and biases);
- the LoRA A products are one batched product over the stacked A weights, each member with its own dropout mask
  (drawn over the input repeated once per member, as PEFT draws one per layer); without dropout, one product
  over the concatenated A weights;
- the B products stay one per member (their output sizes differ), scaled and added to the member's base part.

So a Qwen2 layer runs 15 products forward and 26 backward. The values are PEFT's up to rounding (a product over
more columns may sum in another split); the dropout masks are other draws of the same distribution.

Groups are found by name (`SIBLINGS`, shared with the decoding path): all members foldable LoRA layers (plain
LoRA, one adapter: `lora_merge.foldable`) of one rank and dropout rate, or all plain linear layers, over frozen
base weights of one input size, dtype and device. Members are swapped in for the model's own modules only inside
`active()` (the learner's update), so evaluation, decoding and checkpoints see the model as built. The copies
(3.6 GB at the 4B size in bf16) are refreshed at entry when a base weight was replaced or written in place (its
storage or version counter changed); a base weight that has become trainable stops the update with an error, since
its gradient would not reach it through the copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualrl.model.fused_projections import SIBLINGS, FusedGroup, GroupMember, base_linear, members_in_place
from dualrl.model.lora_merge import foldable, is_lora


def _dropout_p(layer: nn.Module) -> float:
    dropout = layer.lora_dropout[layer.active_adapters[0]]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _groupable(members: list[nn.Module]) -> bool:
    bases = [base_linear(m) for m in members]
    if any(b is None or b.weight.requires_grad or (b.bias is not None and b.bias.requires_grad) for b in bases):
        return False
    ref = bases[0].weight
    if not all(b.in_features == bases[0].in_features and b.weight.dtype == ref.dtype for b in bases):
        return False
    if not all(b.weight.device == ref.device for b in bases):
        return False
    lora = [is_lora(m) for m in members]
    if not any(lora):
        return True
    if not all(lora) or not all(foldable(m) for m in members):
        return False
    first = members[0]
    name = first.active_adapters[0]
    return all(
        m.r[m.active_adapters[0]] == first.r[name]
        and _dropout_p(m) == _dropout_p(first)
        and m.lora_A[m.active_adapters[0]].weight.dtype == first.lora_A[name].weight.dtype
        for m in members
    )


class _Group(FusedGroup):
    """One group's concatenated base copy and its members' LoRA layers: every member's output computed at the first
    member's call, the others handed their part (`FusedGroup`)."""

    def __init__(self, members: list[nn.Module]):
        bases = tuple(base_linear(m) for m in members)
        super().__init__(None, None, [b.out_features for b in bases])
        # the model's own modules, kept out of this module's children (their parameters stay under their own names)
        self.originals = tuple(members)
        self.bases = bases
        self.lora = is_lora(members[0])
        self.signature: tuple = ()

    def refresh(self) -> None:
        """The copies from the base weights, when one was replaced or written in place since the last copy."""
        tensors = [t for b in self.bases for t in (b.weight, b.bias) if t is not None]
        for t in tensors:
            if t.requires_grad:
                raise ValueError(
                    "model.train_fuse_projections: a grouped projection's base weight is trainable now; its "
                    "gradient would not reach it through the fused copy. Set model.train_fuse_projections=false"
                )
        signature = tuple((t.data_ptr(), t._version) for t in tensors)
        if signature == self.signature:
            return
        with torch.no_grad():
            self.weight = torch.cat([b.weight for b in self.bases])
            biases = [b.bias for b in self.bases]
            if all(x is None for x in biases):
                self.bias = None
            else:
                self.bias = torch.cat(
                    [x if x is not None else self.weight.new_zeros(b.out_features) for x, b in zip(biases, self.bases)]
                )
        self.signature = signature

    def outputs(self, x: Tensor) -> Sequence[Tensor]:
        base = super().outputs(x)  # the bases' parts of one product over their concatenated copy
        if not self.lora:
            return base
        layers = self.originals
        names = [m.active_adapters[0] for m in layers]
        a = [m.lora_A[n].weight for m, n in zip(layers, names)]
        rank = a[0].shape[0]
        first = layers[0]
        xa = first._cast_input_dtype(x, a[0].dtype)  # as PEFT casts the adapters' input
        p = _dropout_p(first)
        if p and first.lora_dropout[names[0]].training:
            # one mask per member: the input repeated once per member, then dropped out
            dropped = F.dropout(xa.unsqueeze(0).expand(len(layers), *xa.shape), p, training=True)
            h = torch.bmm(dropped.flatten(1, -2), torch.stack(a).transpose(1, 2))
            hidden = [h[i].view(*x.shape[:-1], rank) for i in range(len(layers))]
        else:
            hidden = F.linear(xa, torch.cat(a)).split(rank, dim=-1)
        outs = []
        for b, h, m, n in zip(base, hidden, layers, names):
            outs.append((b + F.linear(h, m.lora_B[n].weight) * m.scaling[n]).to(b.dtype))
        return outs


class TrainProjections:
    """The grouped projections of a language model (see the module's docstring), swapped in by `active()`."""

    def __init__(self, lm: nn.Module):
        self.places: list[tuple[nn.Module, tuple[str, ...]]] = []
        self.groups: list[_Group] = []
        self.members: list[list[GroupMember]] = []
        for parent in lm.modules():
            for names in SIBLINGS:
                found = [parent._modules.get(n) for n in names]
                if all(isinstance(m, nn.Module) for m in found) and _groupable(found):
                    group = _Group(found)
                    self.places.append((parent, names))
                    self.groups.append(group)
                    self.members.append([GroupMember(group, k) for k in range(len(names))])
        if not self.groups:
            raise ValueError(
                "model.train_fuse_projections: no sibling projections of this LLM can be grouped (a group needs "
                "query/key/value or gate/up projections over frozen base weights, all plain LoRA of one rank and "
                "dropout, or all without LoRA); set model.train_fuse_projections=false"
            )

    def active(self):
        """The grouped projections compute together for the block's duration (the update's forward passes; their
        backward needs nothing swapped). The copies are refreshed first where a base weight changed."""
        for group in self.groups:
            group.refresh()
        return members_in_place(self.places, self.members, self.groups)
