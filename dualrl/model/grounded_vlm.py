"""GroundedVLM: a transformers-native InternVL + official SAM2, joined by the `[SEG]` token (Sa2VA).

Two directions share one model:
- `describe(images, masks)`: region prompt (the image tokens under the mask appended as `<vp>` region
  tokens) -> the caption decoding engine (`decode.py`: one prefill per region for its G samples, a fixed-shape
  decode step, CUDA graphs on GPUs) -> captions, token ids, per-token log-probs;
- `segment(images, texts)`: referring prompt -> "Sure, [SEG]." -> hidden state at `[SEG]` ->
  `text_hidden_fcs` -> SAM2 mask decoder -> low-res mask logits.
Image features are computed by `encode_images` once and passed to any number of prompts.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import StoppingCriteria, StoppingCriteriaList

from dualrl.model import sam as samlib
from dualrl.model.decode import CaptionDecoder
from dualrl.model.prompts import PromptBuilder
from dualrl.model.sampling import Sampling, unsupported_generation_settings
from dualrl.model.sequence import Assembler, Feats, Ids, Piece, Sequences
from dualrl.model.transfer import upload

if TYPE_CHECKING:
    from dualrl.model.train_graphs import TrainGraphs
    from dualrl.recipe import ModelSpec


@dataclass
class ImageFeatures:
    """Per-image features, computed once per step: the vision tower's tokens (before mlp1, which trains)
    and SAM2's encoder output."""

    vision: Tensor  # [B, T, Hv] pixel-shuffled ViT tokens
    sam: samlib.SamFeatures | None  # None until segmentation needs it (see `GroundedVLM.encode_images`)

    def __len__(self) -> int:
        return self.vision.shape[0]

    def rows(self, lo: int, hi: int) -> ImageFeatures:
        """Images lo..hi-1, as views (no copy)."""
        rows = slice(lo, hi)
        return ImageFeatures(self.vision[rows], None if self.sam is None else self.sam.select(rows))


@dataclass
class Captions:
    texts: list[str]
    ids: list[Tensor]  # generated ids per caption, the answer end excluded
    logprobs: list[Tensor]  # log-prob of each caption id under the sampling distribution
    finished: list[bool]  # ended with the answer end (False: cut at max_new_tokens)
    ends: list[Tensor]  # the generated ids that ended each caption (the answer end's tokens; empty if cut)
    end_logprobs: list[Tensor] | None = None  # log-prob of each `ends` token, as `logprobs` (None: not recorded)

    FIELDS = ("texts", "ids", "logprobs", "finished", "ends", "end_logprobs")

    def __len__(self) -> int:
        return len(self.texts)

    def part(self, a: int, b: int) -> Captions:
        return Captions(*(None if (v := getattr(self, f)) is None else v[a:b] for f in self.FIELDS))

    @staticmethod
    def join(parts: list[Captions]) -> Captions:
        """The captions of consecutive parts as one (what `part` cut, put back)."""
        values = [[getattr(p, f) for p in parts] for f in Captions.FIELDS]
        return Captions(*(None if None in v else [x for chunk in v for x in chunk] for v in values))

    def sampler_logprobs(self) -> list[Tensor]:
        """Each completion's log-probs under the distribution that sampled it (caption ids, then the tokens that
        ended it): the behaviour policy of an off-policy update."""
        if self.end_logprobs is None:
            raise ValueError("these captions did not record the log-probs of their end tokens")
        return [torch.cat([lp, end]) for lp, end in zip(self.logprobs, self.end_logprobs)]

    def completions(self) -> list[Tensor]:
        """What the sampler chose: each caption's ids followed by the tokens that ended it."""
        return [torch.cat([ids, end]) for ids, end in zip(self.ids, self.ends)]


class _EndText(StoppingCriteria):
    """Stops a row once its generated text contains `end`: an answer end of several tokens (Sa2VA stops on
    its template suffix as text too)."""

    def __init__(self, tokenizer, end: str, width: int):
        self.tokenizer, self.end, self.width = tokenizer, end, width

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.width :])
        return torch.tensor([self.end in t for t in tails], device=input_ids.device)


class LastEncoding:
    """A model's last reusable image encoding (see `GroundedVLM.encode_images`), under its key: the images tensor
    (by identity, held until replaced, so it cannot be a recycled object) and the encoders' weight versions. Models
    whose frozen encoders are one set of weights (`GroundedVLM.share_frozen_encoders`) hold one together: the two
    models of the local runtime, which runs them on one thread (it refuses `runtime.async_rollout`). Key and
    encoding are one attribute, so a reader never pairs one batch's key with another's encoding.

    Images that are consecutive rows of the kept tensor (`images[lo:hi]`, a view of its memory: the micro-batches
    of an update, `micro_batches`) get those rows of its encoding, as views. An in-place write to the kept images
    (through any view: they share its version counter) makes the encoding stale, and it is not found again."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, ImageFeatures, int | None] | None = None

    def get(self, key: tuple) -> tuple[Tensor, ImageFeatures, tuple[int, int] | None] | None:
        """(the kept images tensor, its encoding, None) for that tensor itself; (…, (lo, hi)) for rows of it; None
        for anything else, or when the encoders' weights or the images have changed since."""
        entry = self._entry
        if entry is None or entry[0][1] != key[1] or _written(entry[0][0]) != entry[2]:
            return None
        kept, images = entry[0][0], key[0]
        if kept is images:
            return kept, entry[1], None
        rows = _rows_within(images, kept)
        return None if rows is None else (kept, entry[1], rows)

    def keep(self, key: tuple, feats: ImageFeatures) -> None:
        self._entry = (key, feats, _written(key[0]))

    def clear(self) -> None:
        self._entry = None


def _written(images: Tensor) -> int | None:
    """The count of in-place writes to `images` (inference tensors keep none)."""
    return None if images.is_inference() else images._version


def _rows_within(part: Tensor, whole: Tensor) -> tuple[int, int] | None:
    """(lo, hi) where `part` is `whole[lo:hi]` in `whole`'s own memory, else None."""
    if (
        part.dtype != whole.dtype
        or part.device != whole.device
        or part.dim() == 0
        or part.shape[1:] != whole.shape[1:]
        or part.stride() != whole.stride()
        or part.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
    ):
        return None
    step, offset = whole.stride(0), part.storage_offset() - whole.storage_offset()
    if step <= 0 or offset % step:
        return None
    lo = offset // step
    hi = lo + part.shape[0]
    return (lo, hi) if lo >= 0 and hi <= whole.shape[0] else None


def _tie(module: nn.Module, source: nn.Module) -> int:
    """Make `module`'s parameters and buffers `source`'s own tensors. The two must be built alike (the same
    submodules, slot names, shapes, dtypes and devices): else a ValueError, and nothing is tied. Returns the bytes
    `module` no longer holds."""
    ties = []
    for (name, mine), (other_name, theirs) in itertools.zip_longest(
        module.named_modules(), source.named_modules(), fillvalue=(None, None)
    ):
        if name != other_name or type(mine) is not type(theirs):
            raise ValueError(
                f"cannot share weights: {name!r} ({type(mine).__name__}) against "
                f"{other_name!r} ({type(theirs).__name__})"
            )
        for slots, other in ((mine._parameters, theirs._parameters), (mine._buffers, theirs._buffers)):
            if slots.keys() != other.keys():
                raise ValueError(f"cannot share weights: {name!r} holds {sorted(slots)} against {sorted(other)}")
            for key, tensor in slots.items():
                given = other[key]
                if tensor is None or given is None:
                    if tensor is not given:
                        raise ValueError(f"cannot share weights: {name}.{key} is set in one model only")
                    continue
                if (tensor.shape, tensor.dtype, tensor.device) != (given.shape, given.dtype, given.device):
                    raise ValueError(f"cannot share weights: {name}.{key} differs in shape, dtype or device")
                if tensor is not given:
                    ties.append((slots, key, tensor, given))
    for slots, key, _, given in ties:
        slots[key] = given
    return sum(tensor.numel() * tensor.element_size() for _, _, tensor, _ in ties)


def _image_rows(image_tokens: Tensor, i: int) -> Feats:
    """Image i's tokens as rows of the batch's image tokens [B, T, H], which every prompt of a batch shares."""
    count = image_tokens.shape[1]
    return Feats(image_tokens, range(i * count, (i + 1) * count))


def _is_identity(index: Tensor, n: int) -> bool:
    """Whether a host index picks rows 0..n-1 in order (a device index is not read: that would wait for it)."""
    return not index.is_cuda and len(index) == n and torch.equal(index, torch.arange(n, device=index.device))


def causal_padding_mask(attention: Tensor) -> Tensor:
    """[B, L] padding mask (1 = token) -> the [B, 1, L, L] boolean "may attend" mask of causal attention over the
    tokens, as transformers builds it for sdpa on a padded batch."""
    width = attention.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention.device).tril()
    return causal[None, None] & attention.bool()[:, None, None, :]


def _cell_cover(masks: Tensor, side: int) -> Tensor:
    """The share of each cell of a side x side grid that each mask [N, H, W] covers, [N, side * side] float32.

    Host masks whose sides the grid divides (Sa2VA's 1024 px and 16 x 16 tokens) are counted by block sums in
    numpy, adding the bytes of each cell's row pieces first: about 8x faster on one core than pooling a float
    copy, with shares within an ulp of pooling's and the same cells. Other masks (device ones, uneven cells) go
    through adaptive average pooling."""
    n, h, w = masks.shape
    if masks.device.type != "cpu" or masks.dtype not in (torch.bool, torch.uint8) or h % side or w % side:
        return F.adaptive_avg_pool2d(masks.float().unsqueeze(1), side).flatten(1)
    cells = masks.contiguous().numpy().view(np.uint8).reshape(n, h, side, w // side)
    rows = np.add.reduce(cells, axis=-1, dtype=np.int32)  # [n, h, side]: each cell row's count
    counts = rows.reshape(n, side, h // side, side).sum(axis=2, dtype=np.int32).reshape(n, side * side)
    return torch.from_numpy(counts).float() / ((h // side) * (w // side))


class GroundedVLM(nn.Module):
    def __init__(self, vlm: nn.Module, sam: nn.Module, tokenizer, spec: ModelSpec):
        super().__init__()
        self.vlm = vlm
        self.sam = sam
        self.tokenizer = tokenizer
        self.spec = spec
        hidden = vlm.config.text_config.hidden_size
        # Sa2VA's projection of the [SEG] hidden state into SAM2's prompt space.
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, sam.sam_prompt_embed_dim),
            nn.Dropout(0.0),
        )
        self.seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
        # The answer end closes every answer and stops generation: one token (an eos) or a text of several.
        self.end_text = spec.prompts.answer_end or tokenizer.eos_token
        self.end_ids = tokenizer.encode(self.end_text, add_special_tokens=False)
        self.eos_id = self.end_ids[0] if len(self.end_ids) == 1 else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.prompts = PromptBuilder(spec.prompts, self.end_text)
        self._assembler: Assembler | None = None
        self.encodings = LastEncoding()  # the last reusable encoding, see encode_images
        self._decoder: CaptionDecoder | None = None
        self.train_graphs: TrainGraphs | None = None  # the learner's CUDA graphs, installed during its updates

    # ------------------------------------------------------------------------------------ plumbing
    @property
    def lm(self) -> nn.Module:
        return self.vlm.model.language_model

    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    @property
    def assemble(self) -> Assembler:
        # Rebuilt lazily: LoRA / trainable-token wrappers replace the embedding module after __init__.
        embed = self.vlm.get_input_embeddings()
        if self._assembler is None or self._assembler.embed is not embed:
            self._assembler = Assembler(self.tokenizer, embed)
        return self._assembler

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, Tensor]) -> None:
        """Copy trainable tensors in by name (all of them, or a subset). A parameter sharded by the learners
        (`runtime.learner_sharding: fsdp`) takes this rank's shard, which `state` then holds."""
        params = dict(self.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise KeyError(f"trainable weights do not match the model: missing {missing[:5]}, unexpected {unknown[:5]}")
        names = list(state)
        if names:
            with torch.no_grad():  # one foreach call, not one copy per tensor (hundreds of launches a sync)
                local = [p.to_local() if isinstance(p, DTensor) else p for p in (params[n] for n in names)]
                torch._foreach_copy_(local, [state[n] for n in names])
        self.encodings.clear()

    def autocast(self):
        """The context every forward pass runs in: bf16 autocast when `model.precision` is bf16."""
        if self.spec.precision != "bf16":
            return contextlib.nullcontext()
        # CUDA graphs of the update (`model.train_graphs`) need autocast's cast cache off: a cached cast made
        # outside a capture would be read inside it
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=self.train_graphs is None
        )

    # -------------------------------------------------------------------------------------- images
    def encode_images(self, images: Tensor, sam: bool = True) -> ImageFeatures:
        """uint8 [B,3,H,W] -> features of both encoders (the vision tower's only with `sam=False`: captioning
        needs no SAM2 features). Frozen encoders run without autograd.

        When no gradient can flow into the encoders (autograd off, or both encoders frozen, as by default),
        the last result is kept for the same images tensor (identity, held until replaced, so it cannot be a
        recycled object; rows `images[lo:hi]` of it get those rows, see `LastEncoding`) and unchanged encoder
        weights (their in-place version counters, which optimizer steps bump): describing and then scoring one
        batch with one model — the teacher in the local runtime, eval, or in-process grpo's rollout and learner
        step — encodes each image once, and SAM2's encoder runs only when segmentation first asks for it. Models
        that share their frozen encoders (`share_frozen_encoders`) share this too: in the local runtime the
        learner's update reuses the teacher's, each micro-batch its rows."""
        key = (images, self._encoder_versions())
        reusable = not torch.is_grad_enabled() or self._encoders_frozen()
        if reusable and (found := self.encodings.get(key)) is not None:
            whole, feats, rows = found
            if sam and feats.sam is None:  # for the whole kept batch, where one part of it is the first to ask
                feats.sam = self._encode_sam(upload(whole, self.device))
            return feats if rows is None else feats.rows(*rows)
        images = upload(images, self.device)
        if sam and self.train_graphs is not None and self.train_graphs.applies(images):
            # the learner's update: a graph replay, its outputs overwritten by the next one, so not kept for reuse
            return ImageFeatures(*self.train_graphs.encode(images))
        feats = ImageFeatures(*self.encode_pixels(images, sam))
        if reusable:
            self.encodings.keep(key, feats)
        return feats

    def encode_pixels(self, images: Tensor, sam: bool = True) -> tuple[Tensor, samlib.SamFeatures | None]:
        """uint8 images on the model's device -> (vision tokens [B, T, C] before the projector, SAM2 features or
        None without `sam`); `encode_images` with no reuse."""
        inner = self.vlm.model
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.spec.trainable.vision):
            px = samlib.imagenet_pixels(images, self.spec.vision.image_size).to(self.text_hidden_fcs[0].weight.dtype)
            tokens = inner.vision_tower(pixel_values=px).last_hidden_state[:, 1:]  # drop CLS
            b, n, c = tokens.shape
            side = int(n**0.5)
            grid = inner.pixel_shuffle(tokens.reshape(b, side, side, c), scale_factor=inner.config.downsample_ratio)
            vision = grid.reshape(b, -1, grid.shape[-1])
        return vision, self._encode_sam(images) if sam else None

    def _encode_sam(self, images: Tensor) -> samlib.SamFeatures:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.spec.trainable.sam_encoder):
            return samlib.encode(self.sam, samlib.imagenet_pixels(images, self.spec.sam.image_size))

    def _encoders_frozen(self) -> bool:
        return not (self.spec.trainable.vision or self.spec.trainable.sam_encoder)

    def _encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.vlm.model.vision_tower, self.sam.image_encoder

    def train(self, mode: bool = True) -> GroundedVLM:
        """As `nn.Module.train`, except that a frozen image encoder stays in eval mode: it extracts features, the
        same in an update as in a rollout, so that an encoding can serve both (`share_frozen_encoders`)."""
        super().train(mode)
        if mode:
            trains = (self.spec.trainable.vision, self.spec.trainable.sam_encoder)
            for encoder, trainable in zip(self._encoders(), trains):
                if not trainable:
                    encoder.eval()
        return self

    def share_frozen_encoders(self, source: GroundedVLM) -> int:
        """Take `source`'s image encoders' weights as this model's own, and its last encoding, where both models keep
        their encoders frozen (the default; else nothing happens): the frozen weights are held once, and a batch one
        model encoded is not encoded again by the other (in one process, the teacher's captions and rewards, then the
        learner's update on the same images tensor, or on its rows in micro-batches, `micro_batches`). The
        two models must have one architecture, input sizes and precision (a ValueError otherwise). Returns the bytes
        no longer held twice."""
        if not (self._encoders_frozen() and source._encoders_frozen()):
            return 0
        for key in ("vision", "sam", "precision"):
            if getattr(self.spec, key) != getattr(source.spec, key):
                raise ValueError(f"cannot share encoders: model.{key} differs between the two models")
        freed = sum(_tie(mine, theirs) for mine, theirs in zip(self._encoders(), source._encoders()))
        self.encodings = source.encodings
        return freed

    def _encoder_versions(self) -> tuple[int, int]:
        vision = next(self.vlm.model.vision_tower.parameters())
        sam = next(self.sam.image_encoder.parameters())
        return vision._version, sam._version

    def project(self, feats: ImageFeatures) -> Tensor:
        """InternVL's mlp1 on the vision tokens -> LLM-space image tokens [B, T, H]."""
        return self.vlm.model.multi_modal_projector(feats.vision)

    @staticmethod
    def region_cells(count: int, masks: Tensor, image_index: Tensor | None = None) -> list[list[int]]:
        """Sa2VA region prompt: the image tokens whose grid cell the mask covers (>= half, i.e. a nearest
        downsample), of `count` tokens an image. A region smaller than one cell keeps its best-covered cell instead
        of vanishing. Region i lies in image `image_index[i]` (default: image i); its cells come back as rows of
        the images' tokens read as one matrix [images * count, H]. Worked out where the masks are (host masks: on
        the host, so the host never waits for the device)."""
        side = int(count**0.5)
        cover = _cell_cover(masks, side)
        keep = cover >= 0.5
        empty = ~keep.any(dim=1)
        keep[empty, cover[empty].argmax(dim=1)] = True
        keep = keep.cpu()  # one copy back when the masks were on the device
        region, cell = keep.nonzero(as_tuple=True)
        image = region if image_index is None else image_index.cpu()[region]
        flat, sizes = (image * count + cell).tolist(), keep.sum(dim=1).tolist()
        ends = list(itertools.accumulate(sizes))
        return [flat[end - n : end] for n, end in zip(sizes, ends)]

    # ------------------------------------------------------------------------------------ language
    def lm_hidden(self, seq: Sequences) -> Tensor:
        """Last-layer hidden states of the LLM on assembled sequences; those of padding are not meaningful.

        With sdpa, right-padded rows need no mask: under causal attention every token comes before its row's
        padding and never sees it. An LLM that builds its masks per layer type (Qwen2, Qwen3: `layer_types` in its
        config), all of full attention (no sliding window, which a missing mask would drop), takes them prepared,
        as "none, causal", so sdpa can run its flash kernels (a mask rules them out)
        and transformers builds nothing (with no mask at all it would look for packed sequences in the position
        ids, a check on the host that waits for the device). Other LLMs, and left-padded rows, get the causal
        padding mask ready-made (4-D, what transformers would build) on a GPU: given a 2-D mask, transformers
        first checks on the host whether any row is padded, which waits for the device too."""
        mask = seq.attention_mask
        config = self.lm.config
        if config._attn_implementation == "sdpa":
            if not seq.padded_left and set(getattr(config, "layer_types", None) or ()) == {"full_attention"}:
                mask = dict.fromkeys(config.layer_types)
            elif mask.is_cuda:
                mask = causal_padding_mask(mask)
        # no KV cache: nothing reads it, and filling one copies every layer's keys and values (and, compiled, makes
        # the first layer's call differ from the others': `model.train_compile` would compile twice)
        if self.train_graphs is not None and self.train_graphs.applies(seq.inputs_embeds):
            return self.train_graphs.language(seq.inputs_embeds, mask)  # the learner's update: a graph replay
        out = self.lm(inputs_embeds=seq.inputs_embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    def logits_at(self, hidden: Tensor) -> Tensor:
        """lm_head on selected hidden states only (vocab 150k x full sequence would waste memory)."""
        return self.vlm.lm_head(hidden)

    def lm_loss(self, hidden: Tensor, seq: Sequences, prompts: slice | None = None) -> Tensor:
        """Mean next-token cross-entropy over labelled positions (answers); prompt labels are -100. `prompts`: over
        the labels of those rows only (a batch that holds two terms, each with its weight)."""
        labels = seq.labels[:, 1:]
        host = seq.host_labels[:, 1:]
        if prompts is not None:
            among = torch.zeros(len(host), dtype=torch.bool)
            among[prompts] = True
            host = host.masked_fill(~among[:, None], -100)
        rows, cols = (host != -100).nonzero(as_tuple=True)  # positions known on the host: no device wait
        if rows.numel() == 0:
            return hidden.sum() * 0.0
        rows, cols = upload(rows, hidden.device), upload(cols, hidden.device)
        logits = self.logits_at(hidden[rows, cols])
        return F.cross_entropy(logits.float(), labels[rows, cols])

    # ------------------------------------------------------------------------------- segmentation
    def seg_queries(self, hidden: Tensor, seq: Sequences) -> Tensor:
        """Hidden state at the answer's `[SEG]` input position -> SAM prompt embedding [N, 256]. The answer
        comes last, so its `[SEG]` is the last one in the row (a caption may contain the token too)."""
        is_seg = seq.host_ids == self.seg_id  # on the host: the check and the columns make the host wait for nothing
        if not is_seg.any(dim=1).all():
            raise ValueError("each segmentation prompt must contain a [SEG] token")
        width = is_seg.shape[1]
        cols = upload(width - 1 - is_seg.flip(1).int().argmax(dim=1), hidden.device)
        rows = torch.arange(len(cols), device=hidden.device)
        return self.text_hidden_fcs(hidden[rows, cols])

    def decode_masks(self, queries: Tensor, sam_feats: samlib.SamFeatures | None, image_index: Tensor) -> Tensor:
        if sam_feats is None:
            raise ValueError(
                "these image features hold no SAM2 encoding (encoded with sam=False, for captioning): "
                "encode with encode_images(images) to segment"
            )
        if not _is_identity(image_index, sam_feats.image_embed.shape[0]):  # else no copy of the features
            sam_feats = sam_feats.select(upload(image_index, self.device))
        logits, _ = self.decode_prompts(sam_feats, queries)
        return logits

    def decode_prompts(
        self,
        feats: samlib.SamFeatures,
        queries: Tensor | None,
        points: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SAM2 decoding of one prompt per row of `feats` (`samlib.decode`): a graph replay in the learner's
        update when `model.train_graphs` is on."""
        if self.train_graphs is not None and self.train_graphs.applies(feats.image_embed):
            return self.train_graphs.decode(feats, queries, points)
        return samlib.decode(self.sam, feats, queries, self.spec.multimask, points=points)

    def segment_prompts(self, image_tokens: Tensor, image_index: Tensor, texts: list[str | Ids]) -> list[list[Piece]]:
        return [self.prompts.segment(_image_rows(image_tokens, i), t) for i, t in zip(image_index.tolist(), texts)]

    def segment(
        self,
        images: Tensor | None,
        texts: list[str | Ids],
        feats: ImageFeatures | None = None,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Sequences, Tensor]:
        """Referring segmentation. Returns (low-res mask logits [N,h,w], LLM hidden states, the assembled
        sequences, image tokens). `texts[i]` is a string or an `Ids` piece (a caption, possibly with soft embeddings);
        `image_index[i]` says which image of `feats` it refers to (default: i)."""
        feats = feats if feats is not None else self.encode_images(images)
        if image_index is None:
            image_index = torch.arange(len(texts))
        image_tokens = self.project(feats)
        seq = self.assemble(self.segment_prompts(image_tokens, image_index, texts))
        hidden = self.lm_hidden(seq)
        queries = self.seg_queries(hidden, seq)
        return self.decode_masks(queries, feats.sam, image_index), hidden, seq, image_tokens

    # ---------------------------------------------------------------------------------- captioning
    def region_prompts(
        self, image_tokens: Tensor, masks: Tensor, image_index: Tensor, answers: list[str | Ids | None] | None = None
    ) -> list[list[Piece]]:
        cells = self.region_cells(image_tokens.shape[1], masks, image_index)
        answers = answers if answers is not None else [None] * len(cells)
        return [
            self.prompts.region(_image_rows(image_tokens, i), Feats(image_tokens, c), a)
            for i, c, a in zip(image_index.tolist(), cells, answers)
        ]

    @property
    def decoder(self) -> CaptionDecoder:
        """The caption decoding engine (`model.generation: engine`), made on first use."""
        if self._decoder is None:
            model = weakref.ref(self)  # the decoder must not keep its model (and the memory it holds) alive
            self._decoder = CaptionDecoder(
                lambda: model().token_matrices(),
                self.lm,
                self.spec.attn_implementation,
                lambda: model().autocast(),
                graphs=self.spec.decode_graphs,
                merge_lora=self.spec.decode_merge_lora,
                compile=self.spec.decode_compile,
                fuse=self.spec.decode_fuse_projections,
            )
        return self._decoder

    def token_matrices(self) -> tuple[Tensor, Tensor]:
        """The input embedding matrix and the output head's matrix as the model computes with them: with PEFT's
        trainable token rows merged in (PEFT merges them into a full copy at every forward call; the decoder
        does it once per call). One tensor for both when the LLM ties them."""

        def merged(module: nn.Module) -> Tensor:
            adapter = getattr(module, "token_adapter", None)
            if adapter is None:
                return module.weight
            return adapter.get_merged_weights(adapter.active_adapters)

        def base(module: nn.Module) -> Tensor:
            adapter = getattr(module, "token_adapter", None)
            return (module if adapter is None else adapter.base_layer).weight

        head, embed = self.vlm.lm_head, self.vlm.get_input_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError(
                "the caption decoder assumes an output head without bias (Qwen2, InternLM2 and Llama have none)"
            )
        embed_matrix = merged(embed)
        tied = base(head).data_ptr() == base(embed).data_ptr()
        return embed_matrix, embed_matrix if tied else merged(head)

    @torch.no_grad()
    def describe(
        self,
        images: Tensor | None,
        masks: Tensor,
        feats: ImageFeatures | None = None,
        image_index: Tensor | None = None,
        *,
        group_size: int = 1,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int | None = None,
    ) -> Captions:
        """Caption each (image, mask) region, `group_size` captions per region (consecutive rows, one prompt
        prefilled once for all of them): the decoding engine (`model.generation: engine`) or `generate`."""
        feats = feats if feats is not None else self.encode_images(images, sam=False)
        if image_index is None:
            image_index = torch.arange(masks.shape[0])
        image_tokens = self.project(feats)
        seq = self.assemble(self.region_prompts(image_tokens, masks, image_index), pad_left=True)
        max_new = max_new_tokens or self.spec.max_caption_tokens
        sampling = Sampling(sample, temperature, self._top_k() if sample else 0, top_p)
        if self.spec.generation == "engine":
            self._check_generation_config()
            out = self.decoder(
                seq.inputs_embeds,
                seq.attention_mask,
                group_size,
                max_new,
                sampling,
                self.eos_id,
                self.pad_id,
                self._text_ended if len(self.end_ids) > 1 else None,
            )
            seqs, logp = out.tokens, out.logprobs
        else:
            seqs, logp = self._generate(seq, group_size, max_new, sampling)
        return self._captions(seqs, logp)

    def _top_k(self) -> int:
        """Sampling's top-k as `generate` applies it: the checkpoint's generation config, else transformers'
        default of 50."""
        top_k = getattr(self.vlm.generation_config, "top_k", None)
        return 50 if top_k is None else int(top_k)

    def _check_generation_config(self) -> None:
        odd = unsupported_generation_settings(self.vlm.generation_config)
        if odd:
            raise ValueError(
                f"the checkpoint's generation_config sets {odd}, which the caption decoder does not "
                "apply; set model.generation=generate to decode with them, or clear them there"
            )

    def _text_ended(self, tokens: Tensor) -> Tensor:
        """Rows whose generated text contains a several-token answer end (checked on the host)."""
        tails = self.tokenizer.batch_decode(tokens[:, -(len(self.end_ids) + 2) :].cpu())
        return torch.tensor([self.end_text in t for t in tails], device=tokens.device)

    def _generate(self, seq: Sequences, group_size: int, max_new: int, sampling: Sampling) -> tuple[Tensor, Tensor]:
        """transformers' `generate` (`model.generation: generate`, the path before the engine): every row a
        prompt of its own. Returns the new tokens and their log-probs as the engine does."""
        embeds = seq.inputs_embeds.repeat_interleave(group_size, dim=0)
        attention = seq.attention_mask.repeat_interleave(group_size, dim=0)
        gen_kwargs = {"do_sample": sampling.sample, "max_new_tokens": max_new}
        if self.spec.generation_cache == "static":
            gen_kwargs["cache_implementation"] = "static"
        if sampling.sample:
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        if len(self.end_ids) > 1:
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_EndText(self.tokenizer, self.end_text, len(self.end_ids) + 2)]
            )
        out = self.vlm.generate(
            inputs_embeds=embeds,
            attention_mask=attention,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            **gen_kwargs,
        )
        seqs = out.sequences[:, -len(out.logits) :]  # only the new tokens
        logits = torch.stack(out.logits, dim=1).float()
        if sampling.sample:
            logits = logits / sampling.temperature
        return seqs, torch.log_softmax(logits, dim=-1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)

    def _captions(self, seqs: Tensor, logp: Tensor) -> Captions:
        ids, lps, texts, finished, ends, end_lps = [], [], [], [], [], []
        for row, lp in zip(seqs.cpu(), logp.cpu()):
            n, stop = self.answer_end(row)
            ids.append(row[:n])
            lps.append(lp[:n])
            ends.append(row[n:stop])
            end_lps.append(lp[n:stop])
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
            finished.append(stop > n)
        return Captions(texts=texts, ids=ids, logprobs=lps, finished=finished, ends=ends, end_logprobs=end_lps)

    def answer_end(self, row: Tensor) -> tuple[int, int]:
        """Where the answer end sits in generated ids: (caption length, end of the end marker); equal when the
        row has none (cut at max_new_tokens). A one-token end (or the tokenizer's eos) is found by id; a text
        end by decoding prefixes, the caption keeping only tokens wholly before the marker."""
        hits = (row == self.eos_id).nonzero() if self.eos_id is not None else row[:0]
        first_eos = int(hits[0]) if len(hits) else len(row)
        if len(self.end_ids) == 1:
            return (first_eos, first_eos + 1) if len(hits) else (len(row), len(row))
        decode = self.tokenizer.decode
        for stop in range(1, first_eos + 1):
            text = decode(row[:stop])
            if self.end_text in text:
                at = text.index(self.end_text)
                n = stop - 1
                while n > 0 and len(decode(row[:n])) > at:
                    n -= 1
                return n, stop
        return (first_eos, first_eos + 1) if len(hits) else (len(row), len(row))
