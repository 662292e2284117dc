"""CUDA graphs of a training step's fixed-shape parts (`model.train_graphs`): the two image encoders, SAM2's
prompt-to-mask decoding, and the LLM on each sequence width.

A small model's step is bound by its host: thousands of operators forward and backward, each a trip through
Python and torch's dispatcher for a kernel of a few microseconds. The encoders and SAM2's decoder see the same
shapes at every step of a batch size (images, one query or click per region), so each is captured once per input
signature with `torch.cuda.make_graphed_callables` — its forward and its backward each become one graph replay
inside the step's autograd graph — while the rest of the step (prompt assembly, the LLM on sequences of new
lengths, the losses) stays eager. Gradients are eager's up to the order of float sums (the graphs run the same
kernels).

- A signature is the inputs' shapes, dtypes and whether they need a gradient; a new one is captured (a few eager
  warm-up passes, then the capture) until `max_graphs` are held; past that the part runs eagerly, counted in
  the learner's metric `train/graph_eager_calls`.
- Graphs serve only the learner's update (`active()`), on CUDA, with autograd on; evaluation, rollouts and CPU runs
  run the plain code.
- A graph's backward runs for each of its outputs that needs a gradient, with zeros for those the step leaves
  unused, and those zeros reach the parameters behind them as gradients (where eager leaves None, and AdamW would
  then decay the weights). So the graphs' outputs carry a gradient only where a step can use one: SAM2's predicted
  IoU comes back without one (dualrl's objectives pick masks by it, none trains it), and so do SAM2's
  high-resolution features in a model that does not decode from them.
- A graph reads its inputs from the buffers it was captured with and writes its outputs, and the activations its
  backward reads, to its own: each replay overwrites those of the one before. So a graph serves one call per
  update: a part called again with the same signature in one update (the LLM on two prompt batches of one width)
  gets a graph of its own, its n-th call the n-th graph of that signature. An update's outputs are used within
  it; none is kept (the encodings the model reuses across calls are the plain path's).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from dualrl.model import sam as samlib

log = logging.getLogger(__name__)


class _Encoders(nn.Module):
    """uint8 images on the device -> (vision tokens, SAM2's last level, its two high-resolution levels). Holds the
    two encoders as its modules (their parameters are the graph's), and calls the model's own encoding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower, self.image_encoder = model.vlm.model.vision_tower, model.sam.image_encoder
        self.__dict__["owner"] = model  # not a submodule: the rest of the model's parameters stay out of the graph

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        vision, sam = self.owner.encode_pixels(images)
        high_res = sam.high_res
        if not self.owner.sam.use_high_res_features_in_sam:  # the decoder never reads them: no gradient either
            high_res = [h.detach() for h in high_res]
        return (vision, sam.image_embed, *high_res)


class _Decoder(nn.Module):
    """SAM2's decoding of one prompt per region from aligned features: a language query, a click, or both. Holds
    the mask decoder, the prompt encoder and the no-memory embedding (the graph's parameters)."""

    def __init__(self, sam: nn.Module, multimask: bool, has_query: bool, has_points: bool):
        super().__init__()
        self.decoder, self.prompts, self.no_mem_embed = sam.sam_mask_decoder, sam.sam_prompt_encoder, sam.no_mem_embed
        self.__dict__["sam"] = sam  # not a submodule: its image encoder stays out of the graph
        self.multimask, self.has_query, self.has_points = multimask, has_query, has_points

    def forward(self, image_embed: Tensor, high0: Tensor, high1: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
        query = rest[0] if self.has_query else None
        points = tuple(rest[-2:]) if self.has_points else None
        feats = samlib.SamFeatures(image_embed, [high0, high1])
        masks, iou = samlib.decode(self.sam, feats, query, self.multimask, points=points)
        return masks, iou.detach()  # no objective trains the IoU head: see the module's docstring


class _Language(nn.Module):
    """The LLM's last hidden states on assembled input embeddings: with a prepared 4-D mask as a second input, or
    with the per-layer-type "none" masks of right-padded rows under causal attention (`GroundedVLM.lm_hidden`)."""

    def __init__(self, lm: nn.Module, layer_types: list[str] | None):
        super().__init__()
        self.lm, self.layer_types = lm, layer_types

    def forward(self, embeds: Tensor, *mask: Tensor) -> Tensor:
        attention = mask[0] if mask else dict.fromkeys(self.layer_types)
        return self.lm(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state


def _signature(name: str, args: tuple[Tensor, ...]) -> tuple:
    return (name, *((tuple(a.shape), a.dtype, a.requires_grad) for a in args))


class TrainGraphs:
    """The captured parts of one model's training step, by input signature; installed on the model by `active()`."""

    def __init__(self, model: nn.Module, max_graphs: int = 32):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, Callable] = {}
        self.captures = 0  # parts captured so far
        self.eager_calls = 0  # calls that ran eagerly because max_graphs were held
        self._warned = False
        self._calls: Counter = Counter()  # calls of each signature in this update

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The model's encoders, SAM2 decoding and LLM go through the graphs inside the block (one update)."""
        previous = self.model.train_graphs
        self.model.train_graphs = self
        self._calls.clear()
        try:
            yield
        finally:
            self.model.train_graphs = previous

    @staticmethod
    def applies(*tensors: Tensor) -> bool:
        return torch.is_grad_enabled() and all(t.is_cuda for t in tensors)

    def encode(self, images: Tensor) -> tuple[Tensor, samlib.SamFeatures]:
        out = self._run("encode", lambda: _Encoders(self.model), (images,))
        return out[0], samlib.SamFeatures(out[1], list(out[2:]))

    def decode(
        self, feats: samlib.SamFeatures, query: Tensor | None, points: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        args = (feats.image_embed, *feats.high_res, *(() if query is None else (query,)), *(points or ()))
        name = f"decode(query={query is not None}, points={points is not None})"
        sam, multimask = self.model.sam, self.model.spec.multimask
        return self._run(name, lambda: _Decoder(sam, multimask, query is not None, points is not None), args)

    def language(self, embeds: Tensor, mask: Tensor | dict) -> Tensor:
        """`GroundedVLM.lm_hidden`'s LLM call: one graph per sequence width (widths are multiples of 8)."""
        lm = self.model.lm
        if isinstance(mask, dict):
            return self._run("language", lambda: _Language(lm, list(mask)), (embeds,))
        return self._run("language(mask)", lambda: _Language(lm, None), (embeds, mask))

    def _run(self, name: str, build: Callable[[], nn.Module], args: tuple[Tensor, ...]):
        """The part's outputs as its module returns them (a tensor, or a tuple of them)."""
        key = _signature(name, args)
        key = (*key, self._calls[key])  # the n-th call of a signature in an update: the n-th graph
        self._calls[key[:-1]] += 1
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                self.eager_calls += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "model.train_graphs: %d input signatures captured already; %s with new shapes runs eagerly "
                        "(counted in the metric train/graph_eager_calls)",
                        self.max_graphs,
                        name,
                    )
                return build()(*args)
            graphed = self._capture(build(), args)
            self.graphs[key] = graphed
        return graphed(*args)

    def _capture(self, module: nn.Module, args: tuple[Tensor, ...]) -> Callable:
        # static input buffers of the capture: copies, so that the step's own tensors are not written to
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        self.captures += 1
        # a frozen or unused parameter (SAM2's high-resolution convolutions without their features) gets no gradient
        return torch.cuda.make_graphed_callables(module, sample, allow_unused_input=True)
