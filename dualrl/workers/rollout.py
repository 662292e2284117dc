"""RolloutWorker: mask -> captions with the weights it was last sent (the EMA teacher in `sft_dual`, the
current policy in `grpo`). G captions of one region share one image encoding and one prompt prefill."""

from __future__ import annotations

import torch

from dualrl.algo.rollout_data import RolloutPlan
from dualrl.model.build import build_model
from dualrl.model.grounded_vlm import Captions, GroundedVLM
from dualrl.recipe import ModelSpec


class RolloutWorker:
    def __init__(self, model_spec: ModelSpec, device: str, model: GroundedVLM | None = None):
        self.model = model if model is not None else build_model(model_spec, device)
        self.model.eval()
        self.max_new_tokens = model_spec.max_caption_tokens

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable(state)

    @torch.no_grad()
    def describe(self, batch: dict, plan: RolloutPlan | None = None, seed: int | None = None) -> Captions:
        """Captions for every region of the batch as `plan` says. With `seed`, sampling draws from its own
        seeded generator state, so a step samples the same captions in any process and after a resume."""
        plan = plan or RolloutPlan()
        self.model.eval()  # the in-process grpo rollout shares the learner's model, which trains between calls
        cuda = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None), self.model.autocast():
            if seed is not None:
                torch.manual_seed(seed)
            samples = plan.group_size - plan.greedy_first
            captions = self.model.describe(
                batch["images"],
                batch["masks"],
                group_size=samples,
                sample=plan.sample,
                temperature=plan.temperature,
                top_p=plan.top_p,
                max_new_tokens=plan.max_new_tokens or self.max_new_tokens,
            )
            if not plan.greedy_first:
                return captions
            # after the samples, so they draw what a plan without the greedy row draws; the images' encoding is
            # the one the samples made (kept by the model)
            greedy = self.model.describe(
                batch["images"], batch["masks"], max_new_tokens=plan.max_new_tokens or self.max_new_tokens
            )
        parts = []
        for r in range(len(greedy)):
            parts += [greedy.part(r, r + 1), captions.part(r * samples, (r + 1) * samples)]
        return Captions.join(parts)
