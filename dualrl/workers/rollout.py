"""RolloutWorker: mask -> caption with the weights it was last sent (the EMA teacher in `sft_dual`)."""

from __future__ import annotations

import torch

from dualrl.model.build import build_model
from dualrl.model.grounded_vlm import Captions


class RolloutWorker:
    def __init__(self, recipe, device: str, model=None):
        self.model = model if model is not None else build_model(recipe.model, device)
        self.model.eval()
        self.max_new_tokens = recipe.model.max_caption_tokens

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable(state)

    @torch.no_grad()
    def describe(self, batch: dict, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> Captions:
        return self.model.describe(batch["images"], batch["masks"], sample=sample, temperature=temperature,
                                   top_p=top_p, max_new_tokens=self.max_new_tokens)
