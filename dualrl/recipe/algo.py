"""The `algo:` section: which objective trains (`name`), its own sub-section, the mask losses all of them share, and
the EMA teacher. Only the sub-section of the objective named by `algo.name` is read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dualrl.recipe.section import MAX_BATCH, Section


class LossSpec(Section):
    """Sa2VA's mask losses, shared by every objective: BCE + dice on sampled points, and the LM loss."""

    bce_weight: float = Field(2.0, ge=0, description="Weight of the sigmoid BCE mask loss (Sa2VA: 2.0).")
    dice_weight: float = Field(0.5, ge=0, description="Weight of the dice mask loss (Sa2VA: 0.5).")
    llm_weight: float = Field(
        1.0, ge=0, description="Weight of the LM loss on the segment answer ('Sure, [SEG].') (Sa2VA: 1.0)."
    )
    point_sampling: bool = Field(
        True, description="Compute the mask losses on sampled points (Sa2VA, Mask2Former); false: on every pixel."
    )
    num_points: int = Field(12544, gt=0, description="Points sampled per mask (Sa2VA: 112 * 112).")
    oversample_ratio: float = Field(
        3.0, ge=1, description="Uniform candidates drawn per sampled point, before the uncertain ones are kept."
    )
    importance_sample_ratio: float = Field(
        0.75,
        ge=0,
        le=1,
        description="Share of the points taken where the mask logit is least certain; the rest are uniform.",
    )


class SftDualSpec(Section):
    """The differentiable dual loop: EMA caption -> student soft tokens -> [SEG] -> SAM2 -> mask loss. Read when
    algo.name=sft_dual."""

    dual_weight: float = Field(1.0, ge=0, description="Weight of the soft-caption segmentation loss.")
    ref_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of supervised referring segmentation (regions with a reference expression) in "
        "sft_dual's loss. Its own knob: algo.pretrain.ref_weight weighs the same term in pretrain only.",
    )
    caption_weight: float = Field(
        0.5,
        ge=0,
        description="Weight of the student's LM loss describing regions that carry a reference (anchors the "
        "captioner to language) in sft_dual's loss. Its own knob: algo.pretrain.caption_weight (default 1.0) "
        "weighs the same term in pretrain, where it is a main task rather than an anchor.",
    )
    gumbel_tau: float = Field(
        0.7, gt=0, description="Temperature of the straight-through Gumbel-softmax that makes the soft caption tokens."
    )
    gumbel_top_k: int = Field(
        128, gt=0, description="The soft token mixes only the student's k most likely tokens at each position."
    )
    gumbel_scale: float = Field(
        1.0,
        ge=0,
        description="Scale of the Gumbel noise that picks each soft token's forward value: 1 samples it from the "
        "student's distribution, 0 takes the student's most likely token (the gradient is the softmax's either way).",
    )
    caption_token_dropout: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of teacher caption tokens replaced by padding in the student's teacher-forced input.",
    )
    dual_segmenter: Literal["student", "frozen"] = Field(
        "student",
        description="What segments the soft captions in the dual term. student: the student, in the same pass as "
        "the reference expressions, so the term trains the captioner and the segmenter (the segmenter learns to "
        "return the region's mask for the student's captions, noise included). frozen: the student's current "
        "weights without gradient, in a pass of their own, so the term trains only the captioner, through the soft "
        "tokens, to write captions the segmenter as it stands maps to the region (the image features are detached "
        "too); the segmenter learns from the reference expressions alone.",
    )
    stop_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the where-to-stop term (0: off). Every prefix of each EMA caption (its first 1, 2, "
        "... tokens) is segmented by the student's current weights without gradient; the student learns the end "
        "token after the prefix whose mask agrees best with the region (the whole caption unless a shorter one "
        "gains stop_margin of IoU), on every region, with or without an expression: the captioner is to leave out "
        "what the segmenter reads wrongly. Costs a no-gradient segmentation of caption-length prompts per region "
        "(about twice the step's time on the CPU). On the shapes data it cut captions everywhere or not at all and "
        "did not raise the cycle IoU (docs/experiments.md, Where to stop).",
    )
    stop_margin: float = Field(
        0.02,
        ge=0,
        le=1,
        description="IoU by which a shorter prefix must beat the longer one chosen so far (from the whole caption "
        "down) to become where the caption ends: a few pixels' difference is noise, not a reason to drop words.",
    )


class PretrainSpec(Section):
    """Supervised referring segmentation + region captioning (Sa2VA's own kind of training). Read when
    algo.name=pretrain."""

    ref_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of supervised referring segmentation (the mask losses) in pretrain's loss. Its own "
        "knob: algo.sft_dual.ref_weight weighs the same term in sft_dual only.",
    )
    caption_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of region captioning (the LM loss of describing a region by its expression) in "
        "pretrain's loss. Its own knob: algo.sft_dual.caption_weight (default 0.5) weighs it in sft_dual; set both "
        "alike to compare the objectives at equal supervised weights.",
    )
    point_weight: float = Field(
        0.0,
        ge=0,
        description="Mask loss of SAM2 prompted by one click inside each region (SAM's interactive training): "
        "teaches the from-scratch mask head to segment whatever it is pointed at, as pretrained SAM2 already can.",
    )
    point_regions: Literal["referred", "all"] = Field(
        "referred",
        description="Which regions the click term trains on: those with an expression, or all, mask-only ones "
        "too (clicks need no text): a control that uses the mask-only regions without the dual loop.",
    )

    @model_validator(mode="after")
    def _clicks_everywhere_need_a_weight(self) -> PretrainSpec:
        if self.point_regions == "all" and self.point_weight == 0:
            raise ValueError("point_regions: all needs point_weight > 0 (the click term it widens is off)")
        return self


class GrpoSpec(Section):
    """GRPO on the captioner (knob names as TRL's GRPOConfig); the segmenter keeps its SFT mask loss. Read when
    algo.name=grpo."""

    num_generations: int = Field(8, ge=2, le=MAX_BATCH, description="G: captions sampled per region.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the captions (and of their log-probs).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens of this mass.")
    max_completion_length: int | None = Field(
        None,
        gt=0,
        description="Most tokens of a sampled caption; also the constant normaliser of loss_type=dr_grpo. null: "
        "the same as model.max_caption_tokens.",
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip of the ratio: 1 - epsilon.")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip: 1 + epsilon_high (null: epsilon; DAPO's clip-higher uses e.g. 0.28)."
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="k3 KL to a frozen copy of the starting captioner (0: none, and no reference model is built).",
    )
    baseline: Literal["group", "greedy"] = Field(
        "group",
        description="What a sampled caption's reward is measured against: its group's mean (GRPO), or the reward of "
        "the region's greedy caption, decoded beside the G samples and scored with them (ReMax's baseline; the "
        "group then has G + 1 captions, the greedy one first and out of the policy loss). The group mean rewards "
        "any sample above the group's average, also one worse than the greedy caption that is evaluated; the "
        "greedy baseline rewards only the samples that beat it.",
    )
    credit: Literal["sequence", "after_greedy_prefix"] = Field(
        "sequence",
        description="Which tokens of a sample its advantage reaches: all of them, or (baseline: greedy) those from "
        "where it departs from its region's greedy caption. The tokens before are the greedy caption's own; the "
        "reward difference comes from the rest, and a push on the shared prefix would move the greedy caption "
        "itself.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Advantage = (reward - group mean) / std, the std over the group, over the batch, or none "
        "(Dr. GRPO: no division).",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo",
        description="How per-token losses are averaged: grpo per sequence then over sequences; bnpo over the local "
        "batch's tokens; dr_grpo over B * max_completion_length; dapo over the global batch's tokens.",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="Optimizer updates per rollout batch (the first pass's log-probs are kept as the old policy's "
        "for the ratios).",
    )
    policy_weight: float = Field(1.0, ge=0, description="Weight of the GRPO term in the learner's loss.")
    best_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a likelihood term on each group's best-rewarded caption (mean NLL per token, at the "
        "sampling temperature; rejection-sampling fine-tuning beside GRPO): it pulls the greedy caption towards "
        "the winners, where GRPO moves the sampled distribution. 0: none.",
    )
    seg_target: Literal["reference_or_best", "reference", "best"] = Field(
        "reference_or_best",
        description="What the segmenter's SFT mask loss segments from: a region's reference expression, its "
        "best-rewarded caption, or the reference where there is one, else the best.",
    )
    seg_weight: float = Field(1.0, ge=0, description="Weight of the segmenter's BCE + dice loss.")

    @model_validator(mode="after")
    def _credit_needs_the_greedy_caption(self) -> GrpoSpec:
        if self.credit == "after_greedy_prefix" and self.baseline != "greedy":
            raise ValueError("credit after_greedy_prefix needs baseline: greedy (the caption it is measured from)")
        return self


class AlgoSpec(Section):
    """The training objective and its knobs."""

    name: Literal["pretrain", "sft_dual", "grpo"] = Field(
        "sft_dual",
        description="The objective: pretrain (supervised referring segmentation + captioning), sft_dual (the "
        "differentiable dual loop) or grpo (GRPO on the captioner). Only its own sub-section is read.",
    )
    loss: LossSpec = Field(default_factory=LossSpec, description="Mask and LM losses shared by every objective.")
    sft_dual: SftDualSpec = Field(default_factory=SftDualSpec, description="Knobs of algo.name=sft_dual.")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec, description="Knobs of algo.name=pretrain.")
    grpo: GrpoSpec = Field(default_factory=GrpoSpec, description="Knobs of algo.name=grpo.")
    ema_decay: float = Field(
        0.999,
        ge=0,
        le=1,
        description="Decay of the EMA teacher per step: ema = decay * ema + (1 - decay) * weights (Sa2VA's "
        "self-play teacher: 0.999); 1 freezes the teacher at the starting weights. The teacher captions "
        "(sft_dual) and segments for the rewards.",
    )
