"""Tests for dualrl.algo.soft_tokens (straight-through top-k Gumbel-softmax)."""

from __future__ import annotations

import pytest
import torch

from dualrl.algo.soft_tokens import hard_ids, soft_embeddings, topk_gumbel_softmax


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hard_forward_is_exactly_one_hot() -> None:
    """hard=True: every weight is exactly 0.0 or 1.0 and each row sums to exactly 1."""
    logits = torch.randn(4, 7, 100, generator=_gen(1))
    weights, indices = topk_gumbel_softmax(logits, k=16, tau=0.7, generator=_gen())
    assert weights.shape == indices.shape == (4, 7, 16)
    assert indices.dtype == torch.long
    assert bool(((weights == 0) | (weights == 1)).all())
    assert torch.equal(weights.sum(-1), torch.ones(4, 7))


def test_indices_are_the_top_k_logits_in_order() -> None:
    """The k slots hold the vocabulary ids of the k largest logits, largest first."""
    logits = torch.tensor([0.1, 3.0, -2.0, 2.0, 1.0])
    _, indices = topk_gumbel_softmax(logits, k=3, tau=1.0, generator=_gen())
    assert indices.tolist() == [1, 3, 4]


def test_gradients_reach_the_top_k_logits_only() -> None:
    """Straight-through: d(loss)/d(logits) is non-zero on the top-k logits and zero elsewhere."""
    logits = torch.randn(3, 50, generator=_gen(2)).requires_grad_()
    weights, indices = topk_gumbel_softmax(logits, k=8, tau=0.7, generator=_gen())
    (weights * torch.randn(3, 8, generator=_gen(3))).sum().backward()
    grad = logits.grad
    assert grad is not None
    in_top = torch.zeros_like(grad, dtype=torch.bool).scatter_(-1, indices, True)
    assert bool((grad[in_top] != 0).all())
    assert bool((grad[~in_top] == 0).all())


def test_straight_through_gradient_equals_the_soft_gradient() -> None:
    """The hard weights' gradient equals that of the soft weights drawn with the same noise."""
    logits = torch.randn(2, 30, generator=_gen(4))
    probe = torch.randn(2, 5, generator=_gen(5))
    grads = []
    for hard in (True, False):
        x = logits.clone().requires_grad_()
        weights, _ = topk_gumbel_softmax(x, k=5, tau=0.5, hard=hard, generator=_gen(6))
        (weights * probe).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_samples_follow_softmax_over_the_top_k() -> None:
    """Gumbel-max: the hard choice is distributed as softmax(l) renormalised over the top k (tau-free)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0]).expand(20000, 5)
    weights, indices = topk_gumbel_softmax(logits, k=3, tau=0.3, generator=_gen())
    ids = hard_ids(weights, indices)
    freq = torch.bincount(ids, minlength=5).float() / ids.numel()
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1)  # 0.665, 0.245, 0.090
    torch.testing.assert_close(freq[:3], expected, atol=0.015, rtol=0.0)
    assert freq[3:].sum() == 0


def test_dominant_logit_wins_and_small_tau_makes_soft_nearly_hard() -> None:
    """A logit 8 above the rest is picked ~98 % of the time; at tau = 0.01 soft weights are mostly one-hot."""
    logits = torch.zeros(2000, 50)
    logits[:, 17] = 8.0  # P(pick 17) = e^8 / (e^8 + 49) = 0.984
    weights, indices = topk_gumbel_softmax(logits, k=10, tau=0.01, hard=False, generator=_gen())
    assert (hard_ids(weights, indices) == 17).float().mean() > 0.97
    # Only near-ties of the perturbed logits (gap < ~0.05) keep a row soft at this tau.
    assert (weights.max(-1).values > 0.99).float().mean() > 0.95


def test_k_is_clamped_to_the_vocabulary() -> None:
    """k >= V uses all V tokens: V slots holding a permutation of the vocabulary."""
    logits = torch.randn(2, 5, generator=_gen(7))
    weights, indices = topk_gumbel_softmax(logits, k=10, tau=1.0, generator=_gen())
    assert weights.shape == indices.shape == (2, 5)
    assert torch.equal(indices.sort(-1).values, torch.arange(5).expand(2, 5))


def test_invalid_k_or_tau_are_errors() -> None:
    """k < 1 and tau <= 0 raise ValueError naming the argument."""
    with pytest.raises(ValueError, match="k must"):
        topk_gumbel_softmax(torch.zeros(3), k=0, tau=1.0)
    with pytest.raises(ValueError, match="tau must"):
        topk_gumbel_softmax(torch.zeros(3), k=1, tau=0.0)
    with pytest.raises(ValueError, match="noise_scale must"):
        topk_gumbel_softmax(torch.zeros(3), k=1, tau=1.0, noise_scale=-0.5)


def test_noise_scale_zero_takes_the_most_likely_token_and_draws_nothing() -> None:
    """noise_scale=0: the forward one-hot is on the top logit (index 0 of the sorted top k), the gradient is the
    softmax's, and the generator is not advanced; a small scale moves fewer tokens off the top than 1."""
    logits = torch.randn(256, 50, generator=_gen(3), requires_grad=True)
    gen = _gen(5)
    weights, indices = topk_gumbel_softmax(logits, k=8, tau=0.7, generator=gen, noise_scale=0.0)
    assert torch.equal(weights.argmax(-1), torch.zeros(256, dtype=torch.long))
    assert torch.equal(indices[:, 0], logits.argmax(-1))
    assert torch.equal(gen.get_state(), _gen(5).get_state())
    assert torch.equal(weights.detach()[:, 1:], torch.zeros(256, 7))
    weights[:, 1].sum().backward()  # the straight-through gradient reaches the logits though the weight is 0
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    off_top = {}
    for scale in (0.1, 1.0):
        w, _ = topk_gumbel_softmax(logits.detach(), k=8, tau=0.7, generator=_gen(9), noise_scale=scale)
        off_top[scale] = (w.argmax(-1) != 0).float().mean().item()
    assert off_top[0.1] < off_top[1.0]


def test_generator_makes_draws_reproducible() -> None:
    """Same generator seed -> identical weights; another seed -> different draws."""
    logits = torch.randn(64, 40, generator=_gen(8))
    w1, i1 = topk_gumbel_softmax(logits, k=8, tau=0.7, hard=False, generator=_gen(11))
    w2, i2 = topk_gumbel_softmax(logits, k=8, tau=0.7, hard=False, generator=_gen(11))
    w3, _ = topk_gumbel_softmax(logits, k=8, tau=0.7, hard=False, generator=_gen(12))
    assert torch.equal(w1, w2) and torch.equal(i1, i2)
    assert not torch.equal(w1, w3)


def test_weights_keep_the_logits_dtype() -> None:
    """bf16 logits give bf16 weights that are still exactly one-hot."""
    logits = torch.randn(3, 20, generator=_gen(9)).bfloat16()
    weights, _ = topk_gumbel_softmax(logits, k=4, tau=0.7, generator=_gen())
    assert weights.dtype == torch.bfloat16
    assert torch.equal(weights.sum(-1), torch.ones(3, dtype=torch.bfloat16))


def test_soft_embeddings_is_the_weighted_sum_of_rows() -> None:
    """soft_embeddings = sum_j w_j * E[idx_j]; hard weights give exactly E[hard_ids]; any callable works."""
    embed = torch.nn.Embedding(30, 6)
    logits = torch.randn(2, 3, 30, generator=_gen(10))

    weights, indices = topk_gumbel_softmax(logits, k=4, tau=0.7, hard=False, generator=_gen())
    manual = torch.zeros(2, 3, 6)
    for b in range(2):
        for t in range(3):
            for j in range(4):
                manual[b, t] += weights[b, t, j] * embed.weight[indices[b, t, j]]
    torch.testing.assert_close(soft_embeddings(weights, indices, embed), manual)
    torch.testing.assert_close(soft_embeddings(weights, indices, lambda ids: embed(ids)), manual)

    weights, indices = topk_gumbel_softmax(logits, k=4, tau=0.7, hard=True, generator=_gen())
    ids = hard_ids(weights, indices)
    assert ids.shape == (2, 3)
    assert torch.equal(soft_embeddings(weights, indices, embed), embed(ids))


def test_soft_embeddings_backpropagates_to_logits_and_table() -> None:
    """Gradients from the mixed embedding reach both the logits (via weights) and the embedding rows."""
    embed = torch.nn.Embedding(30, 6)
    logits = torch.randn(4, 30, generator=_gen(12)).requires_grad_()
    weights, indices = topk_gumbel_softmax(logits, k=5, tau=0.7, generator=_gen())
    soft_embeddings(weights, indices, embed).pow(2).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0
