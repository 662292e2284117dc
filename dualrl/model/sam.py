"""SAM2 as the mask head of a grounded VLM: build it with the official `sam2` package, encode images once,
decode many language queries against the cached encoding.

The split between `encode` and `decode` is the main speed lever of the dual loop: the image encoder (frozen
in Sa2VA) runs once per image, and every caption or referring expression of that image only pays for the
light mask decoder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sam2.build_sam import build_sam2
from sam2.modeling.position_encoding import PositionEmbeddingRandom, PositionEmbeddingSine
from sam2.modeling.sam2_base import SAM2Base

from dualrl.model.transfer import rand

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Parts of SAM2 that only the video (memory) path uses. Image-level grounding never runs them, so the
# tiny default neither trains nor stores them (they are rebuilt from the config, as any fresh SAM2 is).
VIDEO_ONLY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)


class ScaledPositionEmbedding(PositionEmbeddingRandom):
    """SAM2's random-Fourier positional encoding with a gain on its output (same buffers and state_dict).

    Prompt and image encodings both pass through it, so the gain strengthens the position match the
    decoder's attention must learn; from scratch this shortens the plateau before prompts are used."""

    pe_gain: float = 1.0

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        return self.pe_gain * super()._pe_encoding(coords)


class BroadcastPositionEmbedding(PositionEmbeddingSine):
    """SAM2's sine encoding of the image encoder's FPN levels, the same values, made once per level size, dtype and
    device and handed out as a view over the batch (`expand`) where SAM2's own makes a copy per image (`repeat`).

    Its one reader is the memory attention of the video path, which dualrl does not run; a copy per image of each
    level was only a cost: the tiny model's encoder took 222.5 ms for a batch of 8 on 2 CPU cores with the copies,
    185.4 ms without (`benchmarks/cpu_step.py`)."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = self.__dict__.setdefault("_levels", {})  # not module state: nothing saved, nothing to load
        key = (x.shape[-2], x.shape[-1], x.dtype, x.device)
        level = views.get(key)
        if level is None:
            level = views[key] = self._pe(1, x.device, *key[:2])[0].to(x.dtype)
        return level[None].expand(x.shape[0], -1, -1, -1)


def build_sam(
    config: str, image_size: int, overrides: list[str], checkpoint: str | None, pe_gain: float = 1.0
) -> SAM2Base:
    """Compose SAM2 from one of the package's configs plus hydra overrides; load a `.pt` if given.

    `apply_postprocessing` is off: its dynamic multimask fallback changes outputs between train and eval
    mode, which would make the EMA segmenter's reward depend on a mode flag.
    """
    extra = [f"++model.image_size={image_size}", *overrides]
    model = build_sam2(
        config,
        ckpt_path=None,
        device="cpu",
        mode="train",
        hydra_overrides_extra=extra,
        apply_postprocessing=False,
    )
    if checkpoint is not None:
        load_sam_checkpoint(model, checkpoint, config)
    neck_pe = model.image_encoder.neck.position_encoding
    if type(neck_pe) is PositionEmbeddingSine:  # a class swap, as below: same state, deepcopy and pickling work
        neck_pe.__class__ = BroadcastPositionEmbedding
    if pe_gain != 1.0:
        pe = model.sam_prompt_encoder.pe_layer
        pe.__class__ = ScaledPositionEmbedding  # a class swap keeps deepcopy and pickling working
        pe.pe_gain = pe_gain
    return model


def load_sam_checkpoint(model: SAM2Base, path: str, config: str) -> None:
    """An official SAM2 checkpoint (`.pt` holding {"model": state_dict}, read with weights_only=True) or a
    `.safetensors` file; a checkpoint that does not fit the config is refused with the keys that differ."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"model.sam.checkpoint={str(path)!r} does not fit model.sam.config={config!r}: missing "
            f"{result.missing_keys[:8]} ({len(result.missing_keys)}), unexpected "
            f"{result.unexpected_keys[:8]} ({len(result.unexpected_keys)})"
        )


@dataclass
class SamFeatures:
    """Frozen image-encoder output for a batch of images (no grad; reusable by any number of queries)."""

    image_embed: torch.Tensor  # [B, C, h, w] last FPN level (stride 16)
    high_res: list[torch.Tensor]  # FPN levels at stride 4 and 8, before the decoder's conv_s0/conv_s1

    def select(self, index: torch.Tensor | slice) -> SamFeatures:
        """The images at `index`: a copy for an index tensor, views for a slice."""
        return SamFeatures(self.image_embed[index], [f[index] for f in self.high_res])


def imagenet_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,3,H,W] → float input of either encoder (SAM2 and InternViT both use ImageNet statistics):
    plain square resize (aspect squashed, as Sa2VA does for SAM2), ImageNet normalisation."""
    x = images.float().div(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = _imagenet_stats(x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=8)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as [1, 3, 1, 1] float32 tensors on `device`, made once (a fresh tensor from a Python
    list at every call is a blocking host-to-device copy on a GPU)."""
    return (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device),
    )


def encode(sam: SAM2Base, pixels: torch.Tensor) -> SamFeatures:
    """Run SAM2's image encoder. Gradients flow only if the encoder itself is trainable."""
    out = sam.image_encoder(pixels)
    fpn = out["backbone_fpn"]
    return SamFeatures(image_embed=fpn[-1], high_res=list(fpn[:2]))


def decode(
    sam: SAM2Base,
    feats: SamFeatures,
    queries: torch.Tensor | None,
    multimask: bool,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one mask per prompt; `feats` must already be aligned with the prompts (`SamFeatures.select`).

    Follows Sa2VA's grounding path: `no_mem_embed` added to the last level (no memory in training), the
    language query appended to the sparse prompt after a padding point (label -1), no dense prompt. `points`
    (coords [N,P,2] in SAM input pixels, labels [N,P]) replace the padding point for click prompts. With
    `multimask`, the three candidate masks are decoded and the one with the highest predicted IoU kept.
    The object-score gate of the video path is not applied: it would cut the gradient of a whole sample.

    Returns low-res mask logits [N, 4h, 4w] and the predicted IoU of the returned masks [N].
    """
    n = feats.image_embed.shape[0]
    device = feats.image_embed.device
    image_embed = feats.image_embed + sam.no_mem_embed.view(1, -1, 1, 1)
    decoder = sam.sam_mask_decoder
    high_res = None
    if sam.use_high_res_features_in_sam:
        high_res = [decoder.conv_s0(feats.high_res[0]), decoder.conv_s1(feats.high_res[1])]
    if points is None:
        points = (torch.zeros(n, 1, 2, device=device), -torch.ones(n, 1, dtype=torch.int32, device=device))
    sparse, dense = sam.sam_prompt_encoder(points=points, boxes=None, masks=None)
    if queries is not None:
        sparse = torch.cat([sparse, queries.unsqueeze(1).to(sparse.dtype)], dim=1)
    masks, iou_pred, _, _ = decoder(
        image_embeddings=image_embed,
        image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=False,
        high_res_features=high_res,
    )
    best = iou_pred.argmax(dim=1)
    rows = torch.arange(n, device=masks.device)
    return masks[rows, best].float(), iou_pred[rows, best].float()


def click_inside(masks: torch.Tensor, sam_size: int, generator: torch.Generator | None = None):
    """One positive click per mask, uniform over its pixels, in SAM input pixel coordinates (x, y)."""
    n, h, w = masks.shape
    score = rand((n, h * w), generator, masks.device) * masks.flatten(1).float()
    flat = score.argmax(dim=1)
    ys, xs = (flat // w).float(), (flat % w).float()
    coords = torch.stack([(xs + 0.5) * sam_size / w, (ys + 0.5) * sam_size / h], dim=-1).unsqueeze(1)
    return coords, torch.ones(n, 1, dtype=torch.int32, device=masks.device)
