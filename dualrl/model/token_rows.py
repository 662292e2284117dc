"""PEFT's trainable token rows (the new tokens: `[SEG]`, `<vp>`, ...) computed without a merged matrix.

PEFT's `TrainableTokensLayer` writes its rows into a copy of the whole matrix at every call: it builds their
index from a Python list (a host-to-device copy that makes the host wait for the device), copies the embedding or
output head (151k rows at the 4B's vocabulary), and in the backward pass makes a gradient of the full matrix to
read back those few rows. The same values come from the base matrix and the rows alone:

- embedding: look the ids up in the base matrix, then put the trainable row wherever an id is a new token
  (picked by a one-hot product);
- output head: the base logits, then the new tokens' logits (inputs times their rows) in their columns.

`install(module)` gives every such layer under `module` this forward (a subclass swapped in, so state dicts,
`isinstance` checks and PEFT's merge and export stay as they are). The row indices go to the device once per
device and are kept. What the fast path does not cover (merged or disabled adapters, an embedding with
`max_norm`, sparse gradients or a padding row among the new tokens, an output head with a bias) takes PEFT's path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import Tensor, nn


class TokenRowsLayer(TrainableTokensLayer):
    """`TrainableTokensLayer` with a forward that never copies the matrix nor waits for the device."""

    def _rows_on(self, adapter: str, device: torch.device) -> Tensor:
        """The adapter's row indices [k] on `device`, copied there once."""
        cache = self.__dict__.setdefault("_dualrl_rows", {})
        key = (adapter, device, tuple(self.token_indices[adapter]))
        if key not in cache:
            cache[key] = torch.tensor(key[2], dtype=torch.long).to(device)
        return cache[key]

    def get_merged_weights(self, active_adapters) -> Tensor:
        weight = self.base_layer.weight
        for adapter in active_adapters:
            index = self._rows_on(adapter, weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[adapter].to(weight))
        return weight

    def _fast(self, active_adapters) -> bool:
        base = self.base_layer
        if self.disable_adapters or not active_adapters or self.merged:
            return False
        if isinstance(base, nn.Embedding):
            pad = base.padding_idx
            new = {i for a in active_adapters for i in self.token_indices[a]}
            return base.max_norm is None and not base.sparse and not base.scale_grad_by_freq and pad not in new
        return isinstance(base, nn.Linear) and base.bias is None

    def forward_adapters(self, x: Tensor, active_adapters, *args, **kwargs) -> Tensor:
        if not self._fast(active_adapters):
            return super().forward_adapters(x, active_adapters, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        weight = self.base_layer.weight
        if isinstance(self.base_layer, nn.Embedding):
            out = F.embedding(x, weight, padding_idx=self.base_layer.padding_idx)
            for adapter in active_adapters:
                # which new token each id is, as one-hot rows [..., k]: a product picks the trainable rows, and its
                # backward is a product too (gathering the rows by id would accumulate every position's gradient
                # into them one by one)
                hit = x.unsqueeze(-1) == self._rows_on(adapter, weight.device)
                with torch.autocast(x.device.type, enabled=False):  # the rows as stored, as a lookup gives them
                    rows = hit.to(weight.dtype) @ self.trainable_tokens_delta[adapter].to(weight)
                out = torch.where(hit.any(-1, keepdim=True), rows, out)
            scale = self._get_embed_scale()
            return out if scale is None else out * scale.to(out.dtype)
        out = F.linear(x, weight)
        for adapter in active_adapters:
            index = self._rows_on(adapter, weight.device)
            out = out.index_copy(-1, index, F.linear(x, self.trainable_tokens_delta[adapter].to(weight)))
        return out


def install(module: nn.Module) -> int:
    """Swap every PEFT trainable-token layer under `module` to `TokenRowsLayer`; returns how many."""
    count = 0
    for layer in module.modules():
        if type(layer) is TrainableTokensLayer:
            layer.__class__ = TokenRowsLayer
            count += 1
    return count
