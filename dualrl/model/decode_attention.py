"""How the caption decoder attends: `packed_sdpa` for one query token under grouped-query attention, the switch of a
model's attention implementation for a decoding call, and the masks it takes."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The decoder runs attention as `packed_sdpa` (boolean "may attend" masks), whatever the model trains with
# (sdpa, flash_attention_2: 2-D padding masks only, ...), except eager, which keeps transformers' own with an
# additive mask.
PACKED_SDPA = "dualrl_packed_sdpa"


def packed_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """sdpa for one query token under grouped-query attention, without copying the KV cache per query head.

    With a mask, transformers' sdpa path (some versions) repeats every key/value head for its query heads before
    calling sdpa: at decode time that copies the whole cache, every layer, every token. Here the query heads of
    one key/value group become that group's query positions ([B, H, 1, d] -> [B, H_kv, H/H_kv, d]), which the
    mask ([B, 1, 1, K]) broadcasts over; the output is the same attention. Other shapes go to transformers'."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    groups = key.shape[1]
    if q_len != 1 or heads == groups or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query.view(b, groups, heads // groups, dim), key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)


@contextlib.contextmanager
def attention_implementation(config, name: str | None):
    """Run the decoder's attention layers with another registered attention function for the block's duration
    (they look the name up at every call); None leaves them as they are."""
    if name is None:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def decode_mask(allowed: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """[B, Q, K] "may attend" -> the 4-D mask transformers' attention takes as given."""
    mask = allowed.unsqueeze(1)
    return mask if implementation != "eager" else additive_mask(mask, dtype)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean "may attend" mask as an additive one (0 where allowed, the dtype's lowest value elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
