"""Training objectives: what one learner step optimises, given a batch of regions (and captions, for the
dual loop). Each objective is a small class with one `__call__`, registered by name (`registry.py`, which also
says what an objective declares); the learner, the runtimes and the driver loop read those declarations and never
branch on the algorithm's name.

- `Pretrain`: Sa2VA's supervised training at tiny scale: referring segmentation (text -> mask, LM loss on
  "Sure, [SEG].") and region captioning (mask -> reference expression).
- `Grpo` (`grpo_objective.py`): GRPO on the captioner from rewarded samples, SFT mask loss on the segmenter.
- `SftDual`: the differentiable dual loop. The EMA model's caption of each region is teacher-forced
  through the student; the student's next-token logits become straight-through top-k Gumbel-softmax soft
  tokens; those tokens are the expression of a referring prompt; `[SEG]` -> SAM2 -> BCE + dice against the
  original mask. The mask loss thus trains the segmenter and, through the soft tokens, the captioner.
  Regions that carry a reference also get the supervised terms, which anchor both directions. With
  `stop_weight`, the student also learns where each EMA caption is best cut: the end token after the prefix its
  current segmenter maps best to the region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dualrl.algo.common import MaskTerms, StepOutput, canonical, pick_references, ref_rows, segment_view
from dualrl.algo.losses import mask_iou
from dualrl.algo.registry import register
from dualrl.algo.rollout_data import RolloutPlan
from dualrl.algo.soft_tokens import hard_ids, soft_embeddings, topk_gumbel_softmax
from dualrl.model import sam as samlib
from dualrl.model.grounded_vlm import GroundedVLM, ImageFeatures
from dualrl.model.sequence import Ids
from dualrl.model.transfer import upload

if TYPE_CHECKING:
    from dualrl.recipe import AlgoSpec, Recipe


@register("pretrain")
class Pretrain:
    rollout_weights = None  # no rollout: supervised terms only
    iterations = 1

    @classmethod
    def plan(cls, recipe: Recipe) -> RolloutPlan | None:
        return None

    @classmethod
    def needs_reference(cls, algo_spec: AlgoSpec) -> bool:
        return False

    def __init__(self, algo_spec: AlgoSpec, model: GroundedVLM | None = None, reference: GroundedVLM | None = None):
        self.spec = algo_spec.pretrain
        self.llm_weight = algo_spec.loss.llm_weight
        self.mask_terms = MaskTerms(algo_spec.loss)

    def __call__(self, model: GroundedVLM, batch: dict, rollout, generator: torch.Generator) -> StepOutput:
        rows = ref_rows(batch)
        every = self.spec.point_weight > 0 and self.spec.point_regions == "all"
        if not rows and not every:  # nothing supervised in this batch: a zero loss still connected to the graph
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return StepOutput(zero, {})
        images, masks = batch["images"], batch["masks"]
        index = torch.tensor(rows, dtype=torch.long)
        ref_masks = masks if len(rows) == len(masks) else masks[index]
        if every or len(rows) == len(images):  # every image encoded: the batch's own (pinned) tensors
            image_index = index
        else:  # only the regions with an expression
            images, masks = images[index], ref_masks
            image_index = torch.arange(len(rows))
        feats = model.encode_images(images)
        loss, metrics = 0.0, {}
        ref_gt = upload(ref_masks, model.device) if rows else None
        if rows:
            loss, metrics = self.supervised(model, batch, rows, ref_masks, ref_gt, feats, image_index, generator)
        if self.spec.point_weight > 0:  # the masks of the encoded images: the referred ones' unless every region
            gt = ref_gt if ref_masks is masks else upload(masks, model.device)
            clicks = samlib.click_inside(gt, model.spec.sam.image_size, generator)
            point_logits, _ = model.decode_prompts(feats.sam, None, points=clicks)
            p_mask, p_dice, p_iou = self.mask_terms(point_logits, gt, generator)
            loss = loss + self.spec.point_weight * (p_mask + p_dice)
            metrics["train/point_iou"] = p_iou
        return StepOutput(loss, metrics)

    def supervised(
        self,
        model: GroundedVLM,
        batch: dict,
        rows: list[int],
        masks: Tensor,
        gt: Tensor,
        feats: ImageFeatures,
        image_index: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Referring segmentation and captioning of the regions `rows` (their `masks` on the host, `gt` on the
        device; images `image_index` of `feats`)."""
        logits, hidden, seq, image_tokens = model.segment(
            None, pick_references(batch, rows, generator), feats=feats, image_index=image_index
        )
        loss_mask, loss_dice, iou = self.mask_terms(logits, gt, generator)
        llm_loss = model.lm_loss(hidden, seq)
        # region prompts from the host masks: their cells are picked without a device round trip
        cap_seq = model.assemble(model.region_prompts(image_tokens, masks, image_index, canonical(batch, rows)))
        caption_loss = model.lm_loss(model.lm_hidden(cap_seq), cap_seq)
        loss = (
            self.spec.ref_weight * (loss_mask + loss_dice)
            + self.llm_weight * llm_loss
            + self.spec.caption_weight * caption_loss
        )
        metrics = {
            "train/loss_mask": loss_mask.detach(),
            "train/loss_dice": loss_dice.detach(),
            "train/llm_loss": llm_loss.detach(),
            "train/caption_loss": caption_loss.detach(),
            "train/ref_iou": iou,
        }
        return loss, metrics


@register("sft_dual")
class SftDual:
    rollout_weights = "ema"
    iterations = 1

    @classmethod
    def plan(cls, recipe: Recipe) -> RolloutPlan:
        """One greedy caption per region by the EMA teacher."""
        return RolloutPlan()

    @classmethod
    def needs_reference(cls, algo_spec: AlgoSpec) -> bool:
        return False

    def __init__(self, algo_spec: AlgoSpec, model: GroundedVLM, reference: GroundedVLM | None = None):
        self.spec = algo_spec.sft_dual
        self.llm_weight = algo_spec.loss.llm_weight
        self.mask_terms = MaskTerms(algo_spec.loss)
        self.pad_id = model.pad_id

    def _teacher_forced(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        """The EMA caption as the student's input, with a share of tokens replaced by padding so the
        student must predict them from the region rather than copy them."""
        keep = torch.rand(ids.shape, generator=generator) >= self.spec.caption_token_dropout
        return torch.where(keep, ids, torch.full_like(ids, self.pad_id))

    def __call__(self, model: GroundedVLM, batch: dict, rollout, generator: torch.Generator) -> StepOutput:
        device = model.device
        n = len(batch["expression"])
        rows = ref_rows(batch)
        feats = model.encode_images(batch["images"])  # once, for every prompt below
        image_tokens = model.project(feats)
        all_idx = torch.arange(n)

        seg_feats, seg_masks = segment_view(model, batch, feats)  # the frames to segment and their masks
        seg_masks = upload(seg_masks, device)

        # 1) Student teacher-forced on the EMA captions (+ supervised captioning of referenced regions, + where to
        #    end each EMA caption).
        answers: list = [Ids(self._teacher_forced(c, generator), mark="caption") for c in rollout.ids]
        answers += canonical(batch, rows)
        cap_index = torch.cat([all_idx, torch.tensor(rows, dtype=torch.long)])
        supervised = len(answers)
        if self.spec.stop_weight > 0:
            stops = self.stops(model, seg_feats, seg_masks, rollout.ids)
            kept = [r for r, k in enumerate(stops) if k > 0]
            answers += [Ids(rollout.ids[r][: stops[r]], stop=True) for r in kept]
            cap_index = torch.cat([cap_index, torch.tensor(kept, dtype=torch.long)])
        cap_seq = model.assemble(model.region_prompts(image_tokens, batch["masks"][cap_index], cap_index, answers))
        cap_hidden = model.lm_hidden(cap_seq)
        caption_loss = model.lm_loss(cap_hidden, cap_seq, slice(0, supervised))

        # 2) Soft tokens from the student's next-token logits at each caption position.
        r, c = cap_seq.marks.get("caption", (torch.zeros(0, dtype=torch.long),) * 2)
        logits = model.logits_at(cap_hidden[r, c - 1])
        weights, indices = topk_gumbel_softmax(
            logits.float(),
            self.spec.gumbel_top_k,
            self.spec.gumbel_tau,
            hard=True,
            generator=generator,
            noise_scale=self.spec.gumbel_scale,
        )
        soft = soft_embeddings(weights.to(logits.dtype), indices, model.vlm.get_input_embeddings())
        ids = hard_ids(weights, indices)
        lengths = [len(x) for x in rollout.ids]
        soft_captions = [Ids(i, embeds=e) for i, e in zip(ids.split(lengths), soft.split(lengths))]

        # 3) Referring: reference expressions (supervised) and soft captions (dual), on the frames to segment (the
        #    same frames, except for frame pairs); one pass, or the soft captions apart through frozen weights.
        references = pick_references(batch, rows, generator)
        ref_index = torch.tensor(rows, dtype=torch.long)
        frozen = self.spec.dual_segmenter == "frozen"
        if frozen:
            texts, seg_index = references, ref_index
        else:
            texts, seg_index = references + soft_captions, torch.cat([ref_index, all_idx])
        k = len(rows)
        if texts:
            seg_logits, seg_hidden, seg_seq, _ = model.segment(None, texts, feats=seg_feats, image_index=seg_index)
            llm_loss = model.lm_loss(seg_hidden, seg_seq)
        else:  # frozen, and no region of the batch has an expression
            seg_logits, llm_loss = None, torch.zeros((), device=device)
        if frozen:
            with _without_weight_gradients(model):
                still = ImageFeatures(seg_feats.vision.detach(), seg_feats.sam)
                dual_logits = model.segment(None, soft_captions, feats=still, image_index=all_idx)[0]
            seg_logits = dual_logits if seg_logits is None else torch.cat([seg_logits, dual_logits])
        ref_gt = seg_masks[ref_index]
        ref_mask, ref_dice, ref_iou = self.mask_terms(seg_logits[:k], ref_gt, generator)
        dual_mask, dual_dice, dual_iou = self.mask_terms(seg_logits[k:], seg_masks, generator)

        s = self.spec
        loss_mask = s.ref_weight * ref_mask + s.dual_weight * dual_mask
        loss_dice = s.ref_weight * ref_dice + s.dual_weight * dual_dice
        loss = loss_mask + loss_dice + self.llm_weight * llm_loss + s.caption_weight * caption_loss
        metrics = {}
        if s.stop_weight > 0:
            stop_loss = model.lm_loss(cap_hidden, cap_seq, slice(supervised, None))
            loss = loss + s.stop_weight * stop_loss
            lengths = torch.tensor([len(c) for c in rollout.ids], dtype=torch.float)
            metrics["train/stop_loss"] = stop_loss.detach()
            metrics["train/stop_tokens_cut"] = (lengths - torch.tensor(stops, dtype=torch.float)).mean().item()
        metrics |= {
            "train/loss_mask": loss_mask.detach(),
            "train/loss_dice": loss_dice.detach(),
            "train/llm_loss": llm_loss.detach(),
            "train/caption_loss": caption_loss.detach(),
            "train/dual_iou": dual_iou,
            "train/soft_token_agreement": _agreement(ids, rollout.ids),
        }
        if k:
            metrics["train/ref_iou"] = ref_iou
        return StepOutput(loss, metrics)

    @torch.no_grad()
    def stops(self, model: GroundedVLM, feats: ImageFeatures, masks: Tensor, captions: list[Tensor]) -> list[int]:
        """Per caption, how many of its tokens to keep: the length of the prefix whose mask, segmented by the
        model as it stands, has the best IoU with the region's. From the whole caption down, a shorter prefix
        takes the place of the one chosen so far only when it gains `stop_margin` over it. An empty caption keeps 0
        (no prefix to try)."""
        tried = [r for r, c in enumerate(captions) if len(c)]
        if not tried:
            return [0] * len(captions)
        prefixes, region = caption_prefixes(captions)
        logits = model.segment(None, [Ids(p) for p in prefixes], feats=feats, image_index=region)[0]
        ious = mask_iou(logits, masks[upload(region, masks.device)]).cpu()
        keep = [0] * len(captions)
        for r, iou in zip(tried, ious.split([len(captions[r]) for r in tried])):
            best = 0  # index into longest-first prefixes
            for j in range(1, len(iou)):
                if iou[j] > iou[best] + self.spec.stop_margin:
                    best = j
            keep[r] = len(captions[r]) - best
        return keep


def caption_prefixes(captions: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Every non-empty prefix of each caption, the whole caption first, and the index of the caption each belongs
    to (an empty caption has none)."""
    prefixes = [c[:k] for c in captions for k in range(len(c), 0, -1)]
    region = torch.tensor([r for r, c in enumerate(captions) for _ in range(len(c))], dtype=torch.long)
    return prefixes, region


@contextlib.contextmanager
def _without_weight_gradients(model: GroundedVLM) -> Iterator[None]:
    """The model's trainable weights as constants for the block's duration: the passes it runs give gradients to
    their inputs (soft caption embeddings) but none to the weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _agreement(ids: Tensor, teacher: list[Tensor]) -> Tensor | float:
    """Share of soft-token positions whose forward token equals the EMA caption's token, on the device."""
    if ids.numel() == 0:
        return 0.0
    return (ids == upload(torch.cat(teacher), ids.device)).float().mean()
