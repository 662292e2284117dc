"""GRPO (Group Relative Policy Optimization) as small pure tensor functions, following TRL's knob names.

A batch holds N = B completions, G per prompt, stored as consecutive rows (rows 0..G-1 are prompt 0, ...).

Advantages (one scalar per completion), with mean and std taken over the prompt's group g(i):

    A_i = (r_i - mean_g(r)) / (std(r) + eps),    eps = 1e-4
    scale_rewards = "group": std over the group (default)
                    "batch": std over the whole (local) batch; the mean stays per group
                    "none":  no division, A_i = r_i - mean_g(r) (Dr. GRPO)

std is torch's unbiased (Bessel) std. With G = 1 that std is nan; such a group has no baseline to compare
against, so its advantage is defined as 0 (TRL does the same by setting the std to 0, since r_i - mean = 0).

Per-token loss, for token t of completion i, with logp = log pi_theta and old = log pi_old:

    rho_it  = exp(logp_it - old_it)
    l_it    = -min(rho_it * A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) * A_i)  [+ beta * KL_it]
    KL_it   = exp(ref_it - logp_it) - (ref_it - logp_it) - 1                           (k3 estimator)

epsilon = 0.2; epsilon_high defaults to epsilon. The KL term is added only when beta != 0.

Aggregation over the mask m (1 = completion token, 0 = padding), ``loss_type``:

    "grpo":    (1/B) sum_i [sum_t m_it l_it / max(sum_t m_it, 1)]   (per-sequence mean, then mean)
    "bnpo":    sum_it m_it l_it / max(sum_it m_it, 1)                 (token mean over the local batch)
    "dr_grpo": sum_it m_it l_it / (B * max_completion_length)        (constant normaliser)
    "dapo":    sum_it m_it l_it / max(global_active_tokens, 1)        (token mean over the global batch;
                                                                       equals "bnpo" without it)

Clip statistics (as TRL logs them), as fractions over masked tokens:

    low-clipped  = (rho < 1 - epsilon) & (A < 0)
    high-clipped = (rho > 1 + epsilon_high) & (A > 0)
    region       = low | high

Gradients flow into ``logp`` only: ``old_logp``, ``ref_logp`` and the advantages are detached inside.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")

# TRL / verl: A = (r - mean) / (std + 1e-4).
_ADV_EPS = 1e-4


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """``[N]`` rewards -> ``[N / G, G]`` float rewards, validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards length {rewards.numel()} is not a multiple of group_size {group_size}")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    return rewards.view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = _ADV_EPS) -> Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_g(r)) / (std(r) + eps)`` (see module docstring).

    Args:
        rewards: ``[N]`` scalar rewards, N a multiple of ``group_size``, groups as consecutive rows.
        group_size: completions per prompt, G.
        scale_rewards: "group" (std of the group), "batch" (std of all N rewards) or "none" (no division).
        eps: added to the std before dividing.

    Returns:
        ``[N]`` advantages (float32 or wider), detached from ``rewards``. Zero for every row when G = 1.
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    grouped = _grouped(rewards.detach(), group_size)
    if group_size == 1:  # Bessel std of one value is nan; r - mean = 0 anyway.
        return torch.zeros_like(grouped).view(-1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (grouped.std() + eps)
    return centred.view(-1)


def greedy_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = _ADV_EPS) -> Tensor:
    """Advantages against each group's first row, its greedy caption (ReMax's baseline): ``A_i = (r_i - r_0) /
    (std(r) + eps)`` for the sampled rows, 0 for the greedy row. The std is the whole group's ("group", greedy row
    included, so samples that all tie with each other but not with the greedy caption get finite advantages), all
    N rewards' ("batch"), or none.

    Args:
        rewards: ``[N]`` rewards, groups of ``group_size`` consecutive rows, the greedy caption's first.
        group_size: 1 + the samples per region (at least 2 samples).
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if group_size < 3:
        raise ValueError(f"a greedy baseline needs a greedy row and at least 2 samples per group, got {group_size}")
    grouped = _grouped(rewards.detach(), group_size)
    centred = grouped - grouped[:, :1]
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (grouped.std() + eps)
    return centred.view(-1)


def zero_spread_fraction(rewards: Tensor, group_size: int, tol: float = 1e-6) -> float:
    """Fraction of groups whose rewards are all equal (``max - min <= tol``): they carry no learning signal.

    Args:
        rewards: ``[N]`` rewards, groups as consecutive rows.
        group_size: completions per prompt, G.
        tol: largest spread still counted as "all equal".
    """
    grouped = _grouped(rewards.detach(), group_size)
    if grouped.shape[0] == 0:
        return 0.0
    spread = grouped.amax(dim=1) - grouped.amin(dim=1)
    return (spread <= tol).float().mean().item()


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 KL estimate of KL(pi_theta || pi_ref): ``exp(d) - d - 1`` with ``d = ref_logp - logp``.

    Non-negative, zero where the two log-probs agree; differentiable in ``logp`` only (``ref_logp`` is detached).
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} differs from logp shape {tuple(logp.shape)}")
    delta = ref_logp.detach().to(logp.dtype) - logp
    return torch.exp(delta) - delta - 1.0


def _check_token_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, ref_logp: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, T], got shape {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} differs from logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logp.shape[0]}], got shape {tuple(advantages.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} differs from logp shape {tuple(logp.shape)}")


def token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate GRPO loss per token, ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta KL``.

    Computed in at least float32. Padding positions are computed too (keep them finite); ``aggregate``
    masks them out.

    Args:
        logp: ``[N, T]`` log-probs of the sampled tokens under the current policy (carries the gradient).
        old_logp: ``[N, T]`` log-probs under the sampling policy (detached).
        advantages: ``[N]`` one advantage per completion (detached).
        epsilon: lower clip width, ratio floor ``1 - epsilon``.
        epsilon_high: upper clip width, ratio ceiling ``1 + epsilon_high``; None means ``epsilon``.
        beta: KL coefficient; the k3 term is added only when ``beta != 0``, which requires ``ref_logp``.
        ref_logp: ``[N, T]`` reference-policy log-probs (detached). When given, its KL is returned even
            with ``beta = 0`` (for logging only).

    Returns:
        ``(per_token [N, T], stats)`` with detached stats: ``ratio`` (rho), ``low_clipped`` and
        ``high_clipped`` (bool masks, TRL's definition) and, when ``ref_logp`` is given, ``kl``.
    """
    _check_token_inputs(logp, old_logp, advantages, ref_logp)
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta = {beta} != 0 needs ref_logp")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")

    logp = logp.to(torch.promote_types(logp.dtype, torch.float32))
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # [N, 1]
    ratio = torch.exp(logp - old_logp.detach().to(logp.dtype))
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)

    stats = {
        "ratio": ratio.detach(),
        "low_clipped": (ratio.detach() < 1.0 - epsilon) & (adv < 0),
        "high_clipped": (ratio.detach() > 1.0 + epsilon_high) & (adv > 0),
    }
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        stats["kl"] = kl.detach()
        if beta != 0.0:
            per_token = per_token + beta * kl
    return per_token, stats


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set; padding never leaks in, even if it holds nan or inf."""
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    global_active_tokens: int | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[N, T]`` per-token loss to a scalar (formulas in the module docstring).

    Rows with an all-zero mask (empty completions) add 0 and never produce nan; an all-zero mask gives 0.

    Args:
        per_token: ``[N, T]`` per-token loss.
        mask: ``[N, T]`` bool or {0, 1} completion mask.
        loss_type: one of ``LOSS_TYPES``.
        max_completion_length: the generation cap L, required for "dr_grpo" (normaliser ``N * L``).
        global_active_tokens: "dapo" only: masked tokens summed over all data-parallel ranks (and
            accumulation steps sharing one normaliser); None means the local count (then "dapo" == "bnpo").
            Under DDP, which averages gradients over ranks, pass ``total / world_size`` to get the global
            token mean (TRL does this).

    Returns:
        Scalar loss.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from per_token shape {tuple(per_token.shape)}")
    if per_token.dim() != 2:
        raise ValueError(f"per_token must be [N, T], got shape {tuple(per_token.shape)}")
    mask = mask.bool()

    if loss_type == "grpo":
        lengths = mask.sum(dim=1).clamp(min=1).to(per_token.dtype)
        per_seq = _masked_sum(per_token, mask, dim=1) / lengths
        return per_seq.mean() if per_seq.numel() else per_token.sum() * 0.0
    total = _masked_sum(per_token, mask)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {max_completion_length}")
        return total / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo" and global_active_tokens is not None:
        if not isinstance(global_active_tokens, Tensor) and global_active_tokens < 0:
            raise ValueError(f"global_active_tokens must be >= 0, got {global_active_tokens}")
        return total / torch.as_tensor(global_active_tokens, dtype=total.dtype, device=total.device).clamp(min=1)
    return total / mask.sum().clamp(min=1).to(total.dtype)  # bnpo, and dapo on the local batch


@torch.no_grad()
def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over masked positions, a 0-d float64 tensor where the values are (read on the host
    only when the caller wants it); 0 when the mask is empty."""
    return _masked_sum(values.double(), mask) / mask.sum().clamp(min=1)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    global_active_tokens: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss: ``aggregate(token_loss(...), mask, loss_type)`` plus TRL-style metrics.

    Args:
        logp, old_logp, advantages, epsilon, epsilon_high, beta, ref_logp: see ``token_loss``.
        mask: ``[N, T]`` bool or {0, 1} completion mask.
        loss_type, max_completion_length, global_active_tokens: see ``aggregate``.

    Returns:
        ``(loss, metrics)``: scalar loss (gradient into ``logp`` only) and metrics over masked tokens of the
        local batch, as 0-d tensors on ``logp``'s device (``float()`` reads one; each read waits for the
        device): ``clip_frac`` (low or high), ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean`` and, when
        ``ref_logp`` is given, ``kl`` (mean k3 KL).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logp shape {tuple(logp.shape)}")
    per_token, stats = token_loss(logp, old_logp, advantages, epsilon, epsilon_high, beta, ref_logp)
    loss = aggregate(per_token, mask, loss_type, max_completion_length, global_active_tokens)

    mask = mask.bool()
    low, high = stats["low_clipped"], stats["high_clipped"]
    metrics = {
        "clip_frac": _masked_mean((low | high).float(), mask),
        "clip_frac_low": _masked_mean(low.float(), mask),
        "clip_frac_high": _masked_mean(high.float(), mask),
        "ratio_mean": _masked_mean(stats["ratio"], mask),
    }
    if "kl" in stats:
        metrics["kl"] = _masked_mean(stats["kl"], mask)
    return loss, metrics


def group_winners(rewards: Tensor, group_size: int, tol: float = 1e-6) -> Tensor:
    """Row index of each group's best-rewarded completion, for the groups whose rewards are not all equal
    (spread ``> tol``: a flat group has no winner); ties go to the group's first row. On ``rewards``' device
    (the host's copy of the rewards keeps the host from waiting for the device)."""
    grouped = _grouped(rewards.detach(), group_size)
    spread = grouped.amax(dim=1) - grouped.amin(dim=1) > tol
    best = grouped.argmax(dim=1) + torch.arange(grouped.shape[0], device=grouped.device) * group_size
    return best[spread]


def best_sample_nll(logp: Tensor, mask: Tensor, winners: Tensor) -> Tensor:
    """Mean negative log-prob per token of the rows ``winners`` (each group's best-rewarded completion, from
    ``group_winners``): rejection-sampling fine-tuning (RAFT / ReST style) as a term beside the GRPO loss.

    GRPO's advantages move the *sampled* distribution; the greedy caption follows only as far as that
    distribution's mode moves. Likelihood on the winners pulls the mode itself towards them.

    Args:
        logp: ``[N, T]`` per-token log-probs of the completions (carries the gradient).
        mask: ``[N, T]`` completion mask.
        winners: ``[K]`` row indices into ``logp`` (on its device).

    Returns:
        Scalar ``-sum(logp * mask)`` over the winners' tokens divided by their token count, in at least
        float32; 0 (still connected to ``logp``) when there are none.
    """
    if logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must be the same [N, T]")
    keep = mask.bool()[winners]
    total = _masked_sum(logp[winners].to(torch.promote_types(logp.dtype, torch.float32)), keep)
    return -total / keep.sum().clamp(min=1).to(total.dtype)
