"""Tests for dualrl.algo.grpo (group advantages, clipped surrogate, k3 KL, loss aggregation), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dualrl.algo.grpo import (
    LOSS_TYPES,
    SCALE_REWARDS,
    aggregate,
    best_sample_nll,
    greedy_advantages,
    group_advantages,
    group_winners,
    grpo_loss,
    k3_kl,
    token_loss,
    zero_spread_fraction,
)

F64 = torch.float64
LN2 = math.log(2.0)
# Two groups of G = 4: one with spread, one flat.
REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
# 2x3 per-token loss with a ragged mask: row 0 has 3 tokens, row 1 has 1; padding holds junk that must not leak.
PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]]
RAGGED = [[True, True, True], [True, False, False]]


def _t(values, **kw) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, **kw)


def _assert_close(actual: torch.Tensor, expected: list[list[float]], msg: str | None = None) -> None:
    torch.testing.assert_close(actual, _t(expected), rtol=0.0, atol=1e-12, msg=msg)


def _logp_with_ratios(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, old_logp) with old_logp = -1 and logp = -1 + ln(ratio), so exp(logp - old) = ratio."""
    old = torch.full((len(ratios), len(ratios[0])), -1.0, dtype=F64)
    logp = (old + _t(ratios).log()).requires_grad_(True)
    return logp, old


# --- advantages ---------------------------------------------------------------------------------------------------


def test_group_advantages_divide_by_the_group_std() -> None:
    """Group 0: mean 0.5, Bessel std sqrt(1/3) = 0.57735 -> A = +-0.5 / 0.57745 = +-0.865875; flat group -> 0."""
    adv = group_advantages(_t(REWARDS), group_size=4)
    a = 0.8658754297607016
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], abs=1e-12)
    assert group_advantages(_t(REWARDS), 4, scale_rewards="group").tolist() == adv.tolist()  # the default


def test_batch_scaling_uses_the_batch_std_but_the_group_mean() -> None:
    """Batch mean 1.25, squared deviations sum 5.5 -> std sqrt(5.5 / 7) = 0.886405; A = +-0.5 / 0.886505."""
    adv = group_advantages(_t(REWARDS), 4, scale_rewards="batch")
    a = 0.5640124456324701
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], abs=1e-12)


def test_no_scaling_only_centres_per_group() -> None:
    """Dr. GRPO: A = r - mean_group(r), no division."""
    adv = group_advantages(_t([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0, 5.0]), 4, scale_rewards="none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, -1.0, -1.0, 2.0], abs=1e-12)


def test_groups_of_one_get_zero_advantage_not_nan() -> None:
    """Bessel std of a single value is nan; every scaling returns 0 instead, also for a one-element batch."""
    for scale in SCALE_REWARDS:
        assert group_advantages(_t([3.0, -1.0, 7.0]), 1, scale_rewards=scale).tolist() == [0.0, 0.0, 0.0]
        assert group_advantages(_t([3.0]), 1, scale_rewards=scale).tolist() == [0.0]


def test_advantages_accept_integer_rewards_and_are_detached() -> None:
    """Integer rewards become float; the result has no graph back to the rewards."""
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), 4, scale_rewards="none")
    assert adv.dtype == torch.float32 and adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    assert not group_advantages(_t([1.0, 0.0], requires_grad=True), 2).requires_grad


def test_greedy_advantages_measure_samples_against_the_greedy_row() -> None:
    """Groups [greedy, samples...]: group 0 (0.5 | 1, 0, 0.5): r - r_0 = 0, 0.5, -0.5, 0; Bessel std of the group
    sqrt(1/6) -> +-0.5 / 0.408248 = +-1.224745. Group 1: samples tie with each other (1, 1, 1) but beat the greedy
    0: finite advantages (the whole group's std 0.5), equal and positive. The greedy rows get 0. (eps 1e-4 is
    added to each std.)"""
    rewards = _t([0.5, 1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0])
    a, b = 0.5 / ((1 / 6) ** 0.5 + 1e-4), 1.0 / (0.5 + 1e-4)
    assert greedy_advantages(rewards, 4).tolist() == pytest.approx([0.0, a, -a, 0.0, 0.0, b, b, b], rel=1e-9)
    assert greedy_advantages(rewards, 4, scale_rewards="none").tolist() == [0.0, 0.5, -0.5, 0.0, 0.0, 1.0, 1.0, 1.0]
    flat = greedy_advantages(_t([0.3] * 4), 4)
    assert flat.tolist() == [0.0] * 4  # nothing beats or trails the greedy caption: no signal, no nan
    with pytest.raises(ValueError, match="at least 2 samples"):
        greedy_advantages(_t([1.0, 0.0]), 2)


def test_zero_spread_fraction_counts_flat_groups() -> None:
    """One of two groups is flat -> 0.5; a spread within tol counts as flat."""
    assert zero_spread_fraction(_t(REWARDS), 4) == 0.5
    assert zero_spread_fraction(_t([1.0, 1.0 + 1e-8, 0.0, 1.0]), 2) == 0.5
    assert zero_spread_fraction(_t([1.0, 1.0 + 1e-3, 0.0, 1.0]), 2, tol=1e-2) == 0.5
    assert zero_spread_fraction(_t([1.0, 2.0, 0.0, 1.0]), 2) == 0.0
    assert zero_spread_fraction(_t([5.0, 7.0]), 1) == 1.0  # groups of one are trivially flat


def test_advantage_argument_errors() -> None:
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        group_advantages(_t(REWARDS), 3)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        zero_spread_fraction(_t(REWARDS), 3)
    with pytest.raises(ValueError, match=r"scale_rewards.*'group', 'batch', 'none'"):
        group_advantages(_t(REWARDS), 4, scale_rewards="global")
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_advantages(_t(REWARDS), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(_t([REWARDS]), 4)


# --- KL -----------------------------------------------------------------------------------------------------------


def test_k3_kl_values_and_gradient() -> None:
    """d = ref - logp: d = 0 -> 0; d = ln 2 -> 2 - ln 2 - 1 = 0.306853; d = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147.
    d/dlogp (e^d - d - 1) = 1 - e^d: 0, -1, 0.5. No gradient into ref."""
    logp = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    ref = _t([[0.0, LN2, -LN2]], requires_grad=True)
    kl = k3_kl(logp, ref)
    assert kl.tolist()[0] == pytest.approx([0.0, 0.3068528194400547, 0.1931471805599454], abs=1e-12)
    kl.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -1.0, 0.5], abs=1e-12)
    assert ref.grad is None


# --- per-token surrogate ------------------------------------------------------------------------------------------


def test_on_policy_loss_is_minus_advantage_and_grpo_gradient_is_minus_a_over_len() -> None:
    """rho = 1: token loss -A_i. grpo over a ragged mask (lengths 3, 2; N = 2): loss = mean(-1, +2) = 0.5 and
    d loss / d logp_it = -A_i / (len_i * N): row 0 -> -1/6, row 1 -> 2/4 = 0.5, padding -> 0."""
    logp = _t([[-0.5, -1.0, -2.0], [-0.3, -0.7, -9.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = _t([1.0, -2.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])

    per_token, stats = token_loss(logp, old, adv)
    assert per_token.tolist() == [[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0]]
    assert stats["ratio"].tolist() == [[1.0] * 3] * 2

    loss, metrics = grpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(0.5, abs=1e-12)
    loss.backward()
    _assert_close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]])
    assert {k: float(v) for k, v in metrics.items()} == {
        "clip_frac": 0.0,
        "clip_frac_low": 0.0,
        "clip_frac_high": 0.0,
        "ratio_mean": 1.0,
    }


def test_clipping_values_gradients_and_stats() -> None:
    """epsilon = 0.2. Row 0, A = +2: rho 1.5 -> clipped to 1.2 (loss -2.4, grad 0, high-clipped);
    rho 0.5 -> min(0.5A, 0.8A) = 0.5A unclipped (loss -1, grad -rho A = -1); rho 1 -> -2, grad -2.
    Row 1, A = -1: rho 0.5 -> min(-0.5, -0.8) = 0.8A clipped (loss 0.8, grad 0, low-clipped);
    rho 1.5 -> min(-1.5, -1.2) = 1.5A unclipped (loss 1.5, grad 1.5); rho 1 -> 1, grad 1."""
    logp, old = _logp_with_ratios([[1.5, 0.5, 1.0], [0.5, 1.5, 1.0]])
    adv = _t([2.0, -1.0])
    per_token, stats = token_loss(logp, old, adv, epsilon=0.2)
    _assert_close(per_token, [[-2.4, -1.0, -2.0], [0.8, 1.5, 1.0]])
    per_token.sum().backward()
    _assert_close(logp.grad, [[0.0, -1.0, -2.0], [0.0, 1.5, 1.0]])
    assert stats["low_clipped"].tolist() == [[False, False, False], [True, False, False]]
    assert stats["high_clipped"].tolist() == [[True, False, False], [False, False, False]]

    _, metrics = grpo_loss(logp, old, adv, torch.ones(2, 3, dtype=torch.bool))
    assert float(metrics["clip_frac_low"]) == pytest.approx(1 / 6)
    assert float(metrics["clip_frac_high"]) == pytest.approx(1 / 6)
    assert float(metrics["clip_frac"]) == pytest.approx(2 / 6)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-12)  # (1.5 + 0.5 + 1) * 2 / 6
    # Masking out the two clipped tokens removes them from the statistics: 0 of 4 tokens clipped.
    _, masked = grpo_loss(logp, old, adv, torch.tensor([[False, True, True], [False, True, True]]))
    assert float(masked["clip_frac"]) == 0.0 and float(masked["ratio_mean"]) == pytest.approx(1.0, abs=1e-12)


def test_epsilon_high_moves_only_the_upper_clip() -> None:
    """A = +2: rho 1.5 -> 1.28 * 2 = 2.56 (was 2.4); rho 1.25 is unclipped under 1.28 (loss -2.5, grad -2.5)
    but clipped at 1.2 by the default. A = -1, rho 0.5 stays clipped at 0.8."""
    logp, old = _logp_with_ratios([[1.5, 1.25], [0.5, 1.0]])
    adv = _t([2.0, -1.0])
    per_token, stats = token_loss(logp, old, adv, epsilon=0.2, epsilon_high=0.28)
    _assert_close(per_token, [[-2.56, -2.5], [0.8, 1.0]])
    per_token.sum().backward()
    _assert_close(logp.grad, [[0.0, -2.5], [0.0, 1.0]])
    assert stats["high_clipped"].tolist() == [[True, False], [False, False]]
    assert stats["low_clipped"].tolist() == [[False, False], [True, False]]

    default, default_stats = token_loss(logp, old, adv, epsilon=0.2)
    assert default.tolist()[0] == pytest.approx([-2.4, -2.4], abs=1e-12)
    assert default_stats["high_clipped"].tolist()[0] == [True, True]


def test_beta_adds_beta_times_k3_kl_to_each_token() -> None:
    """rho = 1, A = 1, ref - logp = ln 2, beta = 0.1: loss = -1 + 0.1 (1 - ln 2) = -0.969315;
    gradient -rho A + beta (1 - e^{ln 2}) = -1 - 0.1 = -1.1. Only logp gets a gradient."""
    logp = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    ref = _t([[LN2]], requires_grad=True)
    adv = _t([1.0], requires_grad=True)
    loss, metrics = grpo_loss(logp, old, adv, torch.ones(1, 1), beta=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx(-0.9693147180559946, abs=1e-12)
    assert float(metrics["kl"]) == pytest.approx(1 - LN2, abs=1e-12)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-1.1, abs=1e-12)
    assert old.grad is None and ref.grad is None and adv.grad is None


def test_kl_is_logged_but_not_added_when_beta_is_zero() -> None:
    """With ref_logp and beta = 0, the loss is the plain surrogate and the KL is still reported."""
    logp = torch.zeros(1, 1, dtype=F64)
    plain, plain_metrics = grpo_loss(logp, logp, _t([1.0]), torch.ones(1, 1))
    with_ref, metrics = grpo_loss(logp, logp, _t([1.0]), torch.ones(1, 1), ref_logp=_t([[LN2]]))
    assert with_ref.item() == plain.item() == -1.0
    assert "kl" not in plain_metrics and float(metrics["kl"]) == pytest.approx(1 - LN2, abs=1e-12)


def test_bf16_inputs_are_computed_in_float32() -> None:
    logp = torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)
    per_token, _ = token_loss(logp, logp.detach(), torch.tensor([1.0, -1.0], dtype=torch.bfloat16))
    assert per_token.dtype == torch.float32
    per_token.sum().backward()
    assert logp.grad.dtype == torch.bfloat16 and logp.grad.tolist() == [[-1.0] * 3, [1.0] * 3]


# --- aggregation --------------------------------------------------------------------------------------------------


def test_each_aggregation_on_a_ragged_mask() -> None:
    """Masked tokens: row 0 = 1, 2, 3 (len 3), row 1 = 4 (len 1); sum 10, 4 tokens, N = 2.
    grpo: mean(6/3, 4/1) = 3; bnpo: 10/4 = 2.5; dr_grpo (L = 4): 10 / (2 * 4) = 1.25;
    dapo with 8 global tokens: 10/8 = 1.25, without: 2.5. Junk (100, nan) in the padding never leaks."""
    per_token, mask = _t(PER_TOKEN), torch.tensor(RAGGED)
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.0, abs=1e-12)
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(2.5, abs=1e-12)
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(1.25, abs=1e-12)
    assert aggregate(per_token, mask, "dapo", global_active_tokens=8).item() == pytest.approx(1.25, abs=1e-12)
    assert aggregate(per_token, mask, "dapo", global_active_tokens=torch.tensor(8)).item() == pytest.approx(1.25)
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(2.5, abs=1e-12)
    assert aggregate(per_token, mask.to(F64), "grpo").item() == pytest.approx(3.0, abs=1e-12)  # {0, 1} floats


def test_aggregation_gradients_are_the_normaliser_weights() -> None:
    """d loss / d l_it: grpo 1 / (N len_i) = 1/6 (row 0), 1/2 (row 1); bnpo 1/4; dr_grpo 1/8; 0 on padding."""
    mask = torch.tensor(RAGGED)
    for loss_type, row0, row1 in [("grpo", 1 / 6, 1 / 2), ("bnpo", 1 / 4, 1 / 4), ("dr_grpo", 1 / 8, 1 / 8)]:
        per_token = _t(PER_TOKEN, requires_grad=True)
        aggregate(per_token, mask, loss_type, max_completion_length=4).backward()
        _assert_close(per_token.grad, [[row0] * 3, [row1, 0.0, 0.0]], msg=loss_type)


def test_all_aggregations_agree_on_equal_lengths() -> None:
    """Every row full (T = 3) and max_completion_length = 3: all four reduce to the plain mean 21/6 = 3.5."""
    per_token, mask = _t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.ones(2, 3, dtype=torch.bool)
    losses = [aggregate(per_token, mask, t, max_completion_length=3, global_active_tokens=6).item() for t in LOSS_TYPES]
    assert losses == pytest.approx([3.5] * 4, abs=1e-12)


def test_empty_completions_give_no_nan() -> None:
    """An all-masked-out row adds 0 (grpo: mean(2, 0) = 1; bnpo: 6/3 = 2); an empty batch mask gives 0 with a
    finite (zero) gradient."""
    per_token = _t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(1.0, abs=1e-12)
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(2.0, abs=1e-12)
    for loss_type in LOSS_TYPES:
        loss = aggregate(per_token, torch.zeros(2, 3, dtype=torch.bool), loss_type, max_completion_length=3)
        assert loss.item() == 0.0, loss_type
        (grad,) = torch.autograd.grad(loss, per_token)
        assert torch.equal(grad, torch.zeros_like(grad)), loss_type

    logp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    loss, metrics = grpo_loss(logp, logp.detach(), _t([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)  # mean(-1, 0)
    assert all(math.isfinite(v) for v in metrics.values())
    _, empty_metrics = grpo_loss(logp, logp.detach(), _t([1.0, -1.0]), torch.zeros(2, 3))
    assert empty_metrics == {"clip_frac": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0, "ratio_mean": 0.0}


def test_loss_argument_errors() -> None:
    per_token, mask = _t(PER_TOKEN), torch.tensor(RAGGED)
    with pytest.raises(ValueError, match=r"loss_type.*'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        aggregate(per_token, mask, "sum")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="mask shape"):
        aggregate(per_token, mask[:, :2], "grpo")
    with pytest.raises(ValueError, match="global_active_tokens"):
        aggregate(per_token, mask, "dapo", global_active_tokens=-1)

    logp = torch.zeros(2, 3, dtype=F64)
    adv = _t([1.0, -1.0])
    with pytest.raises(ValueError, match="needs ref_logp"):
        token_loss(logp, logp, adv, beta=0.04)
    with pytest.raises(ValueError, match="old_logp shape"):
        token_loss(logp, logp[:, :2], adv)
    with pytest.raises(ValueError, match="advantages must be"):
        token_loss(logp, logp, _t([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="ref_logp shape"):
        token_loss(logp, logp, adv, beta=0.04, ref_logp=logp[:1])
    with pytest.raises(ValueError, match=r"logp must be \[N, T\]"):
        token_loss(logp[0], logp[0], adv)
    with pytest.raises(ValueError, match="mask shape"):
        grpo_loss(logp, logp, adv, torch.ones(2, 4))
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, logp, adv, torch.ones(2, 3), loss_type="token_mean")


# --- the winners' likelihood term ---------------------------------------------------------------------------------


def test_group_winners_skip_flat_groups_and_break_ties_on_the_first_row() -> None:
    # groups of 4: a winner at row 1; a tie between rows 4 and 6 (row 4 wins); a flat group (no winner)
    rewards = _t([0.1, 0.7, 0.2, 0.0, 0.9, 0.3, 0.9, 0.5, 0.4, 0.4, 0.4, 0.4])
    assert group_winners(rewards, 4).tolist() == [1, 4]
    assert group_winners(_t([1.0, 1.0 + 1e-8]), 2).tolist() == []  # within the tolerance: flat


def test_best_sample_nll_is_the_winners_token_mean_and_its_gradient() -> None:
    logp = _t([[-1.0, -2.0, -3.0], [-0.5, -9.0, float("nan")], [-4.0, -4.0, -4.0]]).requires_grad_(True)
    mask = torch.tensor([*RAGGED, [True, True, False]])
    loss = best_sample_nll(logp, mask, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((1.0 + 2.0 + 3.0 + 0.5) / 4)  # row 2 is no winner; padding never leaks
    loss.backward()
    _assert_close(logp.grad, [[-0.25, -0.25, -0.25], [-0.25, 0.0, 0.0], [0.0, 0.0, 0.0]])
    empty = best_sample_nll(logp, mask, torch.tensor([], dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="must be the same"):
        best_sample_nll(logp, mask[:, :2], torch.tensor([0]))
