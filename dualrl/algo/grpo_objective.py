"""`Grpo`: GRPO on the captioner, SFT mask loss on the segmenter, in one learner step.

The rollout worker sampled G captions per region with the current policy; the reward worker scored them
(weighted total of the recipe's plugins, EMA mask IoU first among them). Here:

1. the policy's per-token log-probs of every caption (+ the tokens that ended it) under the region prompt,
   teacher-forced in one batch that shares each image's encoding (`selective_log_softmax` from TRL, at the
   sampling temperature);
2. group advantages and the clipped GRPO loss (`dualrl.algo.grpo`), with k3 KL to a frozen copy of the
   starting captioner when `beta > 0`, and, with `best_weight > 0`, a likelihood term on each group's
   best-rewarded caption;
3. the segmenter's BCE + dice (+ LM loss on "Sure, [SEG].") on each region's reference expression where it
   has one, else on its best-rewarded caption (`algo.grpo.seg_target`).

With `num_iterations > 1` the learner calls this several times on one rollout: the first call's log-probs
are kept as the old policy's (`Rollout.old_logprobs`), so the ratios of later calls measure the drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from dualrl.algo.common import MaskTerms, StepOutput, pick_references, segment_view
from dualrl.algo.grpo import (
    best_sample_nll,
    greedy_advantages,
    group_advantages,
    group_winners,
    grpo_loss,
    zero_spread_fraction,
)
from dualrl.algo.registry import register
from dualrl.algo.rollout_data import Rollout, RolloutPlan
from dualrl.model.grounded_vlm import GroundedVLM, ImageFeatures
from dualrl.model.sequence import Ids
from dualrl.model.transfer import upload

if TYPE_CHECKING:
    from dualrl.recipe import AlgoSpec, Recipe


def completion_logprobs(
    model: GroundedVLM,
    feats: ImageFeatures,
    masks: Tensor,
    region: Tensor,
    completions: list[Tensor],
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token log-probs of `completions[i]` as the answer to the region prompt of `region[i]`.
    Returns (logp [N, T] zero-padded, mask [N, T], the logits they came from [sum(T_i), V])."""
    image_tokens = model.project(feats)
    answers = [Ids(c, mark="caption") for c in completions]
    seq = model.assemble(model.region_prompts(image_tokens, masks[region], region, answers))
    hidden = model.lm_hidden(seq)
    rows, cols = seq.marks["caption"]
    logits = model.logits_at(hidden[rows, cols - 1]).float()  # the position before a token predicts it
    targets = upload(torch.cat(completions), logits.device)
    from trl.trainer.utils import selective_log_softmax  # TRL pulls `datasets` in: only where it is used

    logp = selective_log_softmax(logits.unsqueeze(0), targets.unsqueeze(0), temperature=temperature)[0]
    lengths = [len(c) for c in completions]
    padded = pad_sequence(list(logp.split(lengths)), batch_first=True)
    mask = pad_sequence([torch.ones(n, dtype=torch.bool, device=logp.device) for n in lengths], batch_first=True)
    return padded, mask, logits


@register("grpo")
class Grpo:
    rollout_weights = "policy"

    def __init__(self, algo_spec: AlgoSpec, model: GroundedVLM, reference: GroundedVLM | None = None):
        self.spec = algo_spec.grpo
        self.llm_weight = algo_spec.loss.llm_weight
        self.mask_terms = MaskTerms(algo_spec.loss)
        self.max_new_tokens = self.spec.max_completion_length or model.spec.max_caption_tokens
        if self.spec.beta > 0 and reference is None:
            raise ValueError("algo.grpo.beta > 0 needs a frozen reference model")
        self.reference = reference
        # how the reference is called: `reference_call(fn, *args)` runs fn(reference, *args); a sharded learner group
        # replaces it with a call that gathers the reference's shards (`sharding.sharded_call`)
        self.reference_call = lambda fn, *args: fn(self.reference, *args)

    @classmethod
    def needs_reference(cls, algo_spec: AlgoSpec) -> bool:
        """A frozen copy of the starting model, for the KL term (beta > 0)."""
        return algo_spec.grpo.beta > 0

    @classmethod
    def plan(cls, recipe: Recipe) -> RolloutPlan:
        g = recipe.algo.grpo
        greedy = g.baseline == "greedy"
        return RolloutPlan(
            group_size=g.num_generations + greedy,
            sample=True,
            greedy_first=greedy,
            temperature=g.temperature,
            top_p=g.top_p,
            max_new_tokens=g.max_completion_length or recipe.model.max_caption_tokens,
        )

    @property
    def iterations(self) -> int:
        return self.spec.num_iterations

    def __call__(self, model: GroundedVLM, batch: dict, rollout: Rollout, generator: torch.Generator) -> StepOutput:
        s = self.spec
        device = model.device
        feats = model.encode_images(batch["images"])  # once: every caption and every seg prompt below
        masks = batch["masks"]  # host masks: region prompts pick their cells without a device round trip
        region = rollout.region
        completions = rollout.captions.completions()  # with the tokens that ended them: the policy chose those

        logp, mask, logits = completion_logprobs(model, feats, masks, region, completions, s.temperature)
        if rollout.old_logprobs is None:  # the policy that sampled: these weights, or older ones (off-policy)
            rollout.old_logprobs = _sampler_logprobs(rollout, logp) if rollout.off_policy else logp.detach()
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp, _, _ = self.reference_call(
                    completion_logprobs, feats, masks, region, completions, s.temperature
                )
        rewards = upload(rollout.rewards, device)
        g = rollout.group_size
        if s.baseline == "greedy":  # each group's first row is the greedy caption: a baseline, not a sample
            adv = greedy_advantages(rewards, g, s.scale_rewards)
            samples = torch.arange(len(completions)) % g != 0
            reach = greedy_departures(completions, g, mask.shape[1]) if s.credit == "after_greedy_prefix" else None
            policy_mask = mask & upload(samples[:, None] if reach is None else reach & samples[:, None], device)
            sampled = samples.nonzero()[:, 0].tolist()  # rows drawn at the temperature (the greedy log-probs are not)
        else:
            adv, policy_mask = group_advantages(rewards, g, s.scale_rewards), mask
            sampled = None
        pg_loss, pg = grpo_loss(
            logp,
            rollout.old_logprobs,
            adv,
            policy_mask,
            epsilon=s.epsilon,
            epsilon_high=s.epsilon_high,
            beta=s.beta,
            ref_logp=ref_logp,
            loss_type=s.loss_type,
            max_completion_length=self.max_new_tokens,
        )

        loss_mask, loss_dice, llm_loss, seg_iou = self._segmenter_terms(
            model, feats, batch, rollout, rewards, generator
        )

        loss = s.policy_weight * pg_loss + s.seg_weight * (loss_mask + loss_dice) + self.llm_weight * llm_loss
        best_nll = None
        if s.best_weight > 0:  # likelihood on each group's winner, found from the host's rewards
            winners = upload(group_winners(rollout.rewards, rollout.group_size), device)
            best_nll = best_sample_nll(logp, mask, winners)
            loss = loss + s.best_weight * best_nll
        with torch.no_grad():
            from trl.trainer.utils import entropy_from_logits

            entropy = entropy_from_logits(logits).mean() if len(logits) else 0.0
        lps = rollout.captions.logprobs
        if sampled is None:
            logp_gap = _logp_gap(logp.detach(), lps)
        else:
            logp_gap = _logp_gap(logp.detach()[sampled], [lps[i] for i in sampled])
        # figures stay on the device (the learner reads them all in one transfer) or come from host data
        metrics = {
            "train/loss_mask": loss_mask.detach(),
            "train/loss_dice": loss_dice.detach(),
            "train/llm_loss": llm_loss.detach(),
            "train/seg_iou": seg_iou,
            "grpo/loss": pg_loss.detach(),
            "grpo/adv_std": adv.std() if len(adv) > 1 else 0.0,
            "grpo/zero_spread_frac": zero_spread_fraction(rollout.rewards, rollout.group_size),
            "grpo/caption_len": sum(len(c) for c in completions) / len(completions),
            "grpo/truncated_frac": 1.0 - sum(rollout.captions.finished) / len(completions),
            "grpo/entropy": entropy,
            "grpo/rollout_logp_gap": logp_gap,
            **{f"grpo/{k}": v for k, v in pg.items()},
        }
        if best_nll is not None:
            metrics["grpo/best_nll"] = best_nll.detach()
        if s.baseline == "greedy":  # the host's rewards: the greedy caption's, and the samples' lead over it
            grouped = rollout.rewards.view(-1, g).double()
            metrics["grpo/greedy_reward"] = grouped[:, 0].mean().item()
            metrics["grpo/samples_over_greedy"] = (grouped[:, 1:] - grouped[:, :1]).mean().item()
        return StepOutput(loss, metrics)

    def _segmenter_terms(
        self,
        model: GroundedVLM,
        feats: ImageFeatures,
        batch: dict,
        rollout: Rollout,
        rewards: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        texts, rows = self._seg_targets(batch, rollout, rewards, generator)
        if not rows:  # seg_target=reference and no region in the batch has one
            zero = model.text_hidden_fcs[0].weight.sum() * 0.0
            return zero, zero, zero, zero
        index = torch.tensor(rows, dtype=torch.long)
        seg_feats, seg_masks = segment_view(model, batch, feats)  # frame t+k of a frame pair
        logits, hidden, seq, _ = model.segment(None, texts, feats=seg_feats, image_index=index)
        loss_mask, loss_dice, iou = self.mask_terms(logits, upload(seg_masks[index], model.device), generator)
        return loss_mask, loss_dice, model.lm_loss(hidden, seq), iou

    def _seg_targets(
        self, batch: dict, rollout: Rollout, rewards: Tensor, generator: torch.Generator
    ) -> tuple[list, list[int]]:
        """Per region: its reference expression, or its best-rewarded caption, as `seg_target` says."""
        g = rollout.group_size
        n = len(batch["masks"])
        has_ref = [bool(batch["expression"][r]) for r in range(n)]
        use_ref = [h and self.spec.seg_target != "best" for h in has_ref]
        ref_rows = [r for r in range(n) if use_ref[r]]
        refs = dict(zip(ref_rows, pick_references(batch, ref_rows, generator)))
        best = rollout.rewards.view(n, g).argmax(dim=1).tolist()  # the host's copy: no device wait
        texts, rows = [], []
        for r in range(n):
            if use_ref[r]:
                texts.append(refs[r])
            elif self.spec.seg_target != "reference":
                texts.append(Ids(rollout.captions.ids[r * g + best[r]]))
            else:
                continue
            rows.append(r)
        return texts, rows


def greedy_departures(completions: list[Tensor], group_size: int, width: int) -> Tensor:
    """[N, width] host bool: True at the tokens of each completion from the first one that differs from its group's
    first (greedy) completion on; all False for the greedy rows and for samples equal to it."""
    out = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, c in enumerate(completions):
        greedy = completions[i - i % group_size]
        n = min(len(c), len(greedy))
        shared = int((c[:n] == greedy[:n]).int().cumprod(0).sum())
        out[i, shared : len(c)] = True  # nothing when the sample is the greedy caption or a prefix of it
    return out


def _laid_out(rows: list[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """Host rows of per-token values padded to `like`'s [N, T] and sent in one copy: (values, which are set)."""
    lengths = torch.tensor([len(r) for r in rows])
    values = torch.zeros(like.shape, dtype=like.dtype)
    if len(rows):
        values[:, : int(lengths.max())] = pad_sequence([r.to(like.dtype) for r in rows], batch_first=True)
    have = torch.arange(like.shape[1]) < lengths[:, None]
    return upload(values, like.device), upload(have, like.device)


def _sampler_logprobs(rollout: Rollout, logp: Tensor) -> Tensor:
    """The sampler's recorded log-probs of each completion, laid out as the learner's `logp` ([N, T], padded)."""
    sampled, have = _laid_out(rollout.captions.sampler_logprobs(), logp)
    return torch.where(have, sampled, logp.detach())


def _logp_gap(logp: Tensor, sampled: list[Tensor]) -> Tensor | float:
    """Mean |learner log-prob - sampler log-prob| over caption tokens: 0 up to dropout and float noise when
    the rollout ran the learner's weights; grows when rollouts lag the policy. A device scalar (no host wait)."""
    if not any(len(lp) for lp in sampled):
        return 0.0
    values, have = _laid_out(sampled, logp)
    return ((logp - values).abs() * have).sum() / have.sum()
