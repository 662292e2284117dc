"""How the caption decoder picks the next token: greedy, or sampling as transformers' `generate` samples
(temperature, then top-k, then top-p), with the chosen token's log-prob under the temperature-scaled distribution;
and the `generate` settings it does not apply (refused when a checkpoint sets them, never ignored)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when `sample` is False; otherwise temperature, top-k (0: off)
    and top-p (1.0: off) in that order, as transformers' sampling warpers apply them."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


# generation_config fields (with their inactive values) by which `generate` would process logits in ways the
# decoder does not: refused when set, never silently ignored
_UNSUPPORTED_GENERATION = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}


def unsupported_generation_settings(config) -> dict:
    """The fields of a generation config that `generate` would apply and this decoder does not."""
    return {
        k: getattr(config, k)
        for k, inactive in _UNSUPPORTED_GENERATION.items()
        if getattr(config, k, inactive) not in (inactive, None)
    }


def choose(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
    """Next token per row from float logits [N, V] and its log-prob under the temperature-scaled distribution
    (what `Captions.logprobs` records and what grpo's ratio compares against)."""
    if not sampling.sample:
        token = logits.argmax(dim=-1)
        return token, torch.log_softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    scaled = logits / sampling.temperature
    scores = scaled
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # transformers' top-p: drop the low tail whose total probability is at most 1 - top_p, keep >= 1 token
        ordered, order = torch.sort(scores, dim=-1)
        tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        tail[:, -1] = False
        scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    token = torch.multinomial(scores.softmax(dim=-1), 1)[:, 0]
    return token, torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None])[:, 0]
