"""The grpo objective on the tiny model: the learner's log-probs are the sampler's, the policy gradient
moves probability towards better-rewarded captions, and the segmenter keeps its supervised mask loss."""

from __future__ import annotations

import pytest
import torch

from dualrl.algo.grpo_objective import Grpo, completion_logprobs
from dualrl.algo.rollout_data import Rollout
from dualrl.model.build import build_model
from dualrl.model.grounded_vlm import Captions
from dualrl.recipe import AlgoSpec

G = 2


def _algo(llm_weight: float = 1.0, **grpo) -> AlgoSpec:
    return AlgoSpec(
        name="grpo", grpo={"num_generations": G, **grpo}, loss={"num_points": 128, "llm_weight": llm_weight}
    )


@pytest.fixture
def policy(tiny_spec):
    torch.manual_seed(0)
    return build_model(tiny_spec).train()


def _sample(model, batch, temperature=1.0):
    region = torch.arange(len(batch["masks"])).repeat_interleave(G)
    model.eval()
    with torch.no_grad():
        caps = model.describe(
            batch["images"],
            batch["masks"][region],
            image_index=region,
            sample=True,
            temperature=temperature,
            max_new_tokens=6,
        )
    model.train()
    return caps


def _logprobs(policy, batch, rollout: Rollout):
    """The rollout's captions' per-token log-probs under `policy` now (eval mode: no dropout)."""
    policy.eval()
    with torch.no_grad():
        feats = policy.encode_images(batch["images"])
        logp, _, _ = completion_logprobs(
            policy, feats, batch["masks"], rollout.region, rollout.captions.completions(), 1.0
        )
    return logp


def test_learner_logprobs_equal_the_samplers(tiny_model, region_batch):
    """Teacher-forcing the sampled captions gives the log-probs `generate` sampled them with (same
    temperature); the eos that ended a finished caption gets a log-prob of its own."""
    torch.manual_seed(1)
    caps = _sample(tiny_model, region_batch, temperature=0.7)
    region = torch.arange(4).repeat_interleave(G)
    completions = caps.completions()
    assert all(e.tolist() == ([tiny_model.eos_id] if f else []) for e, f in zip(caps.ends, caps.finished))
    with torch.no_grad():
        feats = tiny_model.encode_images(region_batch["images"])
        logp, mask, logits = completion_logprobs(tiny_model, feats, region_batch["masks"], region, completions, 0.7)
    assert mask.sum(dim=1).tolist() == [len(c) for c in completions] and len(logits) == sum(map(len, completions))
    for i, lp in enumerate(caps.logprobs):
        torch.testing.assert_close(logp[i, : len(lp)], lp, atol=1e-4, rtol=1e-4)
    assert (logp[mask] <= 0).all() and (logp[~mask] == 0).all()


def test_policy_gradient_moves_probability_to_the_better_caption(policy, region_batch):
    """One SGD step on the GRPO term alone (rewards 1 and 0 inside each group) raises the log-prob of
    each group's rewarded caption relative to the other one."""
    caps = _sample(policy, region_batch)
    rewards = torch.tensor([1.0, 0.0] * 4)
    objective = Grpo(_algo(seg_weight=0.0, llm_weight=0.0, loss_type="grpo"), policy)
    rollout = Rollout(caps, G, rewards)
    gen = torch.Generator().manual_seed(0)
    out = objective(policy, region_batch, rollout, gen)
    before = rollout.old_logprobs.clone()
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.zero_grad(set_to_none=True)
    out.loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 0.5 * p.grad / max(1e-8, max(q.grad.abs().max().item() for q in params if q.grad is not None))
    after = _logprobs(policy, region_batch, rollout)
    seq_gain = (after - before).sum(dim=1).view(4, G)
    distinct = [r for r in range(4) if not torch.equal(caps.ids[2 * r], caps.ids[2 * r + 1])]
    assert distinct
    for r in distinct:
        assert seq_gain[r, 0] > seq_gain[r, 1], (r, seq_gain[r])
    assert out.metrics["grpo/ratio_mean"] == pytest.approx(1.0)


def test_metrics_iterations_and_segmenter_terms(policy, region_batch):
    """The step reports the GRPO diagnostics; a second update on the same rollout keeps the first pass's
    log-probs as the old policy's (the ratio drifts from 1); the segmenter's loss reaches the SAM decoder."""
    caps = _sample(policy, region_batch)
    objective = Grpo(_algo(num_iterations=2), policy)
    rollout = Rollout(caps, G, torch.tensor([0.2, 0.9, 0.5, 0.5, 0.0, 1.0, 0.3, 0.1]))
    out = objective(policy, region_batch, rollout, torch.Generator().manual_seed(0))
    for key in (
        "grpo/clip_frac",
        "grpo/adv_std",
        "grpo/zero_spread_frac",
        "grpo/caption_len",
        "grpo/entropy",
        "train/loss_mask",
        "train/loss_dice",
        "train/seg_iou",
    ):
        assert key in out.metrics
    assert out.metrics["grpo/zero_spread_frac"] == 0.25
    policy.zero_grad(set_to_none=True)
    out.loss.backward()
    decoder = [p.grad for n, p in policy.named_parameters() if "sam_mask_decoder" in n and p.grad is not None]
    assert decoder and any(g.abs().sum() > 0 for g in decoder)
    old = rollout.old_logprobs.clone()
    torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.05).step()
    second = objective(policy, region_batch, rollout, torch.Generator().manual_seed(1))
    assert torch.equal(rollout.old_logprobs, old)
    assert abs(second.metrics["grpo/ratio_mean"] - 1.0) > 1e-4


@pytest.mark.parametrize(
    ("target", "rows", "captions"),
    [
        ("reference_or_best", [0, 1, 2, 3], {1: 3, 3: 7}),
        ("best", [0, 1, 2, 3], {0: 0, 1: 3, 2: 5, 3: 7}),
        ("reference", [0, 2], {}),
    ],
)
def test_segmenter_targets(policy, region_batch, target, rows, captions):
    """Regions with a reference segment from it (unless seg_target=best); the others from the caption of
    their group with the highest reward."""
    caps = _sample(policy, region_batch)
    batch = dict(region_batch, expression=["the red circle", "", "a blue square", ""])
    rewards = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.0, 0.4, 0.3, 0.6])
    texts, got = Grpo(_algo(seg_target=target), policy)._seg_targets(
        batch, Rollout(caps, G, rewards), rewards, torch.Generator().manual_seed(0)
    )
    assert got == rows
    for text, r in zip(texts, got):
        if r in captions:
            assert torch.equal(text.ids, caps.ids[captions[r]])
        else:
            assert isinstance(text, str) and text in batch["references"][r] + [batch["expression"][r]]


def test_kl_to_the_reference_starts_at_zero(tiny_spec, region_batch):
    """With beta > 0 the learner compares with a frozen copy of the starting model: identical at first."""
    torch.manual_seed(0)
    policy = build_model(tiny_spec).eval()  # eval: no LoRA dropout, so policy == reference exactly
    reference = build_model(tiny_spec).eval()
    reference.load_state_dict(policy.state_dict())
    caps = _sample(policy, region_batch)
    policy.eval()
    out = Grpo(_algo(beta=0.04), policy, reference)(
        policy, region_batch, Rollout(caps, G, torch.rand(8)), torch.Generator().manual_seed(0)
    )
    assert out.metrics["grpo/kl"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="beta > 0 needs a frozen reference"):
        Grpo(_algo(beta=0.04), policy)


def test_learner_step_reuses_the_rollouts_encoding(policy, region_batch):
    """In-process grpo samples with the learner's own model: with both encoders frozen, the learner step
    reuses that encoding of the batch (gradients only start at mlp1 and the SAM decoder). Captioning needs no SAM2
    features: its encoder first runs when the learner step segments, once."""
    calls = []
    policy.vlm.model.vision_tower.register_forward_hook(lambda *args: calls.append("vision"))
    policy.sam.image_encoder.register_forward_hook(lambda *args: calls.append("sam"))
    caps = _sample(policy, region_batch)
    assert calls == ["vision"]
    out = Grpo(_algo(), policy)(policy, region_batch, Rollout(caps, G, torch.rand(8)), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert calls == ["vision", "sam"]
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in policy.named_parameters()
        if "multi_modal_projector" in n
    )


def test_best_weight_raises_the_winners_likelihood(policy, region_batch):
    """With only the winners' likelihood term (GRPO and segmenter terms off), one step raises the log-prob of
    each group's best-rewarded caption; a group of equal rewards contributes nothing."""
    caps = _sample(policy, region_batch)
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.5, 0.7, 0.1, 0.3, 0.8])  # winners: rows 1, 4, 7; group 1 is flat
    objective = Grpo(_algo(policy_weight=0.0, seg_weight=0.0, llm_weight=0.0, best_weight=1.0), policy)
    rollout = Rollout(caps, G, rewards)
    out = objective(policy, region_batch, rollout, torch.Generator().manual_seed(0))
    lengths = [len(c) for c in caps.completions()]
    old = rollout.old_logprobs
    winners = [1, 4, 7]
    expected = -sum(old[r, : lengths[r]].sum() for r in winners) / sum(lengths[r] for r in winners)
    assert float(out.metrics["grpo/best_nll"]) == pytest.approx(float(expected), rel=1e-4)
    policy.zero_grad(set_to_none=True)
    out.loss.backward()
    params = [p for p in policy.parameters() if p.requires_grad and p.grad is not None]
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad
    after = _logprobs(policy, region_batch, rollout)
    gain = (after - old).sum(dim=1)
    assert all(gain[r] > 0 for r in winners), gain
    assert "grpo/best_nll" not in Grpo(_algo(), policy)(policy, region_batch, rollout, torch.Generator()).metrics


def test_greedy_baseline_draws_the_greedy_caption_first_and_keeps_it_out_of_the_policy_loss(tiny_spec, region_batch):
    """`algo.grpo.baseline=greedy`: the plan asks for G + 1 captions a region, the greedy one first; the rollout
    worker draws the same samples as a plan without it (same seed) and puts the model's greedy caption before them.
    The policy loss does not depend on the greedy rows' tokens (they are the baseline, not samples), and differs
    from the group-mean baseline's on the same captions and rewards."""
    from dualrl.algo.rollout_data import RolloutPlan
    from dualrl.recipe import RecipeError, load_recipe
    from dualrl.workers.rollout import RolloutWorker
    from tests.conftest import TINY

    recipe = load_recipe(
        "recipes/sft_dual.yaml",
        [*TINY, "output_dir=unused", "algo.name=grpo", f"algo.grpo.num_generations={G}", "algo.grpo.baseline=greedy"],
    )
    plan = Grpo.plan(recipe)
    assert (plan.group_size, plan.greedy_first, plan.sample) == (G + 1, True, True)
    with pytest.raises(RecipeError, match="credit after_greedy_prefix needs baseline: greedy"):
        load_recipe(
            "recipes/sft_dual.yaml",
            [*TINY, "output_dir=unused", "algo.name=grpo", "algo.grpo.credit=after_greedy_prefix"],
        )
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    worker = RolloutWorker(tiny_spec, "cpu", model=model)
    caps = worker.describe(region_batch, plan, seed=7)
    samples = worker.describe(region_batch, RolloutPlan(G, True, plan.temperature, plan.top_p), seed=7)
    greedy = worker.describe(region_batch, RolloutPlan())
    n = len(region_batch["masks"])
    assert len(caps) == n * (G + 1)
    for r in range(n):
        assert torch.equal(caps.ids[r * (G + 1)], greedy.ids[r])
        for k in range(G):
            assert torch.equal(caps.ids[r * (G + 1) + 1 + k], samples.ids[r * G + k])

    model.train()
    rewards = torch.tensor([0.5, 0.9, 0.1] * n)
    spec = _algo(seg_weight=0.0, llm_weight=0.0, baseline="greedy")
    out = Grpo(spec, model)(model, region_batch, Rollout(caps, G + 1, rewards), torch.Generator().manual_seed(0))
    swapped = Captions.join([caps.part(r + 2, r + 3) if r % 3 == 0 else caps.part(r, r + 1) for r in range(3 * n)])
    again = Grpo(spec, model)(model, region_batch, Rollout(swapped, G + 1, rewards), torch.Generator().manual_seed(0))
    assert float(again.metrics["grpo/loss"]) == pytest.approx(float(out.metrics["grpo/loss"]), rel=1e-5)
    assert out.metrics["grpo/greedy_reward"] == pytest.approx(0.5)
    assert out.metrics["grpo/samples_over_greedy"] == pytest.approx(0.0, abs=1e-6)  # (0.9 + 0.1) / 2 - 0.5
    mean_baseline = Grpo(_algo(seg_weight=0.0, llm_weight=0.0), model)
    other = mean_baseline(model, region_batch, Rollout(caps, G + 1, rewards), torch.Generator().manual_seed(0))
    assert float(other.metrics["grpo/loss"]) != pytest.approx(float(out.metrics["grpo/loss"]), rel=1e-3)


def test_greedy_departures_mark_the_tokens_from_where_a_sample_leaves_the_greedy_caption():
    """Groups of 3, greedy first: a sample that shares 2 tokens is marked from its third; one equal to the greedy
    caption, and the greedy row, nowhere; one that stops where the greedy goes on, at its end token; one that goes on
    past a greedy caption that was cut, from its extra token."""
    from dualrl.algo.grpo_objective import greedy_departures

    t = lambda *v: torch.tensor(v)  # noqa: E731
    completions = [t(5, 6, 7, 2), t(5, 6, 9, 2), t(5, 6, 7, 2), t(4, 4), t(4, 2), t(4, 4, 8)]
    got = greedy_departures(completions, 3, 4).int().tolist()
    assert got == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]


def test_credit_after_the_greedy_prefix_leaves_the_shared_tokens_out_of_the_policy_loss(tiny_spec, region_batch):
    """With credit after_greedy_prefix, a sample's policy term covers only the tokens from where it leaves the greedy
    caption: per-token GRPO loss (on-policy: -advantage per token) averaged over exactly those tokens (dapo)."""
    from dualrl.algo.grpo_objective import greedy_departures
    from dualrl.algo.rollout_data import RolloutPlan
    from dualrl.workers.rollout import RolloutWorker

    torch.manual_seed(0)
    model = build_model(tiny_spec)
    plan = RolloutPlan(G + 1, True, 1.5, 1.0, None, greedy_first=True)
    caps = RolloutWorker(tiny_spec, "cpu", model=model).describe(region_batch, plan, seed=3)
    model.train()
    n = len(region_batch["masks"])
    rewards = torch.tensor([0.5, 0.9, 0.1] * n)
    spec = _algo(seg_weight=0.0, llm_weight=0.0, baseline="greedy", credit="after_greedy_prefix")
    out = Grpo(spec, model)(model, region_batch, Rollout(caps, G + 1, rewards), torch.Generator().manual_seed(0))
    completions = caps.completions()
    reach = greedy_departures(completions, G + 1, max(len(c) for c in completions))
    assert reach.any() and not reach.all()
    from dualrl.algo.grpo import greedy_advantages

    adv = greedy_advantages(rewards, G + 1)
    expected = -(adv[:, None] * reach).sum() / reach.sum()
    assert float(out.metrics["grpo/loss"]) == pytest.approx(float(expected), rel=1e-5)
