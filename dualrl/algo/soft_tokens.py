"""Straight-through top-k Gumbel-softmax soft tokens.

The dual loop passes a caption from the captioner to the segmenter without breaking the graph: the
captioner's logits are turned into (mostly one-hot) weights over the k most likely tokens, and the
segmenter reads ``sum_j w_j * E[idx_j]`` as its input embedding. In the forward pass that is exactly the
embedding of one sampled token; in the backward pass the gradient flows to the logits through the
softmax (straight-through estimator; Jang et al. 2017, Bengio et al. 2013).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dualrl.model.transfer import rand


def _gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Float32 Gumbel(0, 1) noise ``g = -log(-log u)``, ``u ~ U(0, 1)``.

    u is clamped to [tiny, 1 - eps/2] so neither log sees 0. Drawn on `device`, reproducible from `generator`
    (see `transfer.rand`).
    """
    u = rand(shape, generator, device)
    finfo = torch.finfo(torch.float32)
    u = u.clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)
    return -torch.log(-torch.log(u))


def topk_gumbel_softmax(
    logits: Tensor,
    k: int,
    tau: float,
    hard: bool = True,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Sample a token among the top-k logits with Gumbel-softmax, optionally straight-through.

    With ``(l_1..l_k), (idx_1..idx_k) = topk(logits, k)`` (k clamped to V) and ``g_j ~ s * Gumbel(0, 1)``
    (s = ``noise_scale``; at 1 a sample from softmax(l), at 0 the most likely token, no noise drawn):

        y_soft_j = softmax_j((l_j + g_j) / tau)
        y_hard_j = 1[j = argmax_i (l_i + g_i)]               # a sample from softmax(l) over the top k
        y        = y_hard + (y_soft - stopgrad(y_soft))      if hard else y_soft

    so the forward value of ``y`` is exactly one-hot and ``dy/dl = dy_soft/dl``. (Written as
    ``y_hard + (y_soft - y_soft.detach())`` rather than ``y_hard - y_soft.detach() + y_soft``: same
    gradient, but the forward value is exactly 0/1 instead of ``(1 - s) + s`` up to rounding.)
    Noise and softmax run in float32; the weights come back in ``logits.dtype`` (0/1 is exact there).

    Args:
        logits: ``[..., V]`` token logits.
        k: number of candidate tokens, >= 1; ``k >= V`` uses all V.
        tau: softmax temperature, > 0 (the dual loop uses 0.7).
        hard: straight-through one-hot forward (True) or plain soft weights (False).
        generator: optional generator for reproducible noise.
        noise_scale: scale of the Gumbel noise, >= 0.

    Returns:
        ``(weights [..., k], indices [..., k])``; indices are vocabulary ids sorted by descending logit.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    k = min(k, logits.shape[-1])
    top_logits, indices = logits.topk(k, dim=-1)
    perturbed = top_logits.float()
    if noise_scale > 0:
        perturbed = perturbed + noise_scale * _gumbel_noise(top_logits.shape, logits.device, generator)
    y_soft = torch.softmax(perturbed / tau, dim=-1)
    if not hard:
        return y_soft.to(logits.dtype), indices
    # argmax of the perturbed logits, not of y_soft: equal in exact arithmetic, but softmax can underflow
    # to ties at small tau.
    y_hard = torch.zeros_like(y_soft).scatter_(-1, perturbed.argmax(-1, keepdim=True), 1.0)
    y = y_hard + (y_soft - y_soft.detach())
    return y.to(logits.dtype), indices


def soft_embeddings(weights: Tensor, indices: Tensor, embed: Callable[[Tensor], Tensor]) -> Tensor:
    """Mix token embeddings: ``e = sum_j w_j * embed(idx_j)``.

    Calls ``embed`` on the k candidate ids (not on a one-hot matrix times the weight table), so any
    embedding module works, wrapped or PEFT, and only k rows are touched. With hard weights the forward
    value equals ``embed(hard_ids(weights, indices))`` exactly.

    Args:
        weights: ``[..., k]`` mixing weights (from ``topk_gumbel_softmax``).
        indices: ``[..., k]`` token ids.
        embed: maps a LongTensor ``[..., k]`` to embeddings ``[..., k, H]``.

    Returns:
        ``[..., H]`` embeddings in the embedding's dtype.
    """
    vectors = embed(indices)  # [..., k, H]
    return (weights.to(vectors.dtype).unsqueeze(-1) * vectors).sum(-2)


def hard_ids(weights: Tensor, indices: Tensor) -> Tensor:
    """Token ids the forward pass represents: ``idx_{argmax_j w_j}``, LongTensor ``[...]``.

    For hard (one-hot) weights this is the sampled token; for soft weights, the heaviest one.
    """
    return indices.gather(-1, weights.argmax(-1, keepdim=True)).squeeze(-1)
