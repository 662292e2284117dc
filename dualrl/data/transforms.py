"""From a decoded region (any size, any aspect) to the square tensors a batch is made of.

Every region is brought to one square working size (`data.image_size`, by default SAM2's input size, 1024
at real scale) in the loader's worker processes, so batches stack and the model's two encoders each take
their input from it: SAM2's by a plain resize to `model.sam.image_size`, the VLM's by a resize to the tile
size (448 for InternVL). Two aspect-ratio policies (`data.aspect`):

- `squash` (default): a plain resize to the square, aspect not kept. This is what Sa2VA feeds both SAM2
  (its 1024 "direct resize") and the VLM on referring data (one 448 tile), so pretrained weights see what
  they were trained on, and every pixel of the mask keeps a place in the input.
- `pad`: the long side is resized to the square, the short side padded at the bottom/right with the
  ImageNet mean colour (zero after normalisation) and the mask with background. Shapes keep their aspect;
  the padding costs resolution.

The image is resized with antialiased bilinear filtering. The mask is resized by area and kept where at
least half of an output pixel is covered; a region that would vanish (thinner than a pixel after the
resize) keeps every output pixel it touches instead, and a region that is still empty is a bad sample.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

from dualrl.data.decode import BadSample, check_mask

Aspect = Literal["squash", "pad"]
PAD_COLOUR = (124, 116, 104)  # ImageNet mean in 8 bits


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3] for size (h, w), bilinear (PIL, shrinking large factors in steps); the
    image itself when it already has that size."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR, reducing_gap=3.0))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [h, w] -> bool [size] by covered area (>= 1/2), never dropping a non-empty region."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    cover = np.asarray(Image.fromarray(_u8(mask)).resize((w, h), Image.BOX))
    out = cover >= 128
    if not out.any() and mask.any():
        out = cover > 0
    return out


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [h, w] -> bool [size] by nearest neighbour (how OpenImages masks are brought to their image)."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(_u8(mask)).resize((w, h), Image.NEAREST)) > 0


def _u8(mask: np.ndarray) -> np.ndarray:
    """bool -> 0/255 uint8 without a widening copy (a bool array is already one byte per pixel)."""
    return np.ascontiguousarray(mask, dtype=bool).view(np.uint8) * np.uint8(255)


def square(
    image: np.ndarray, mask: np.ndarray, size: int, aspect: Aspect = "squash"
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [H, W, 3] + bool [H, W] -> uint8 [3, size, size] + bool [size, size]."""
    if image.shape[:2] != mask.shape:
        raise BadSample("mask_size_mismatch", f"image {image.shape[:2]} vs mask {mask.shape}")
    h, w = mask.shape
    if aspect == "squash":
        out_image, out_mask = resize_image(image, (size, size)), resize_mask(mask, (size, size))
    elif aspect == "pad":
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        out_image = np.empty((size, size, 3), dtype=np.uint8)
        out_image[:] = PAD_COLOUR
        out_image[:nh, :nw] = resize_image(image, (nh, nw))
        out_mask = np.zeros((size, size), dtype=bool)
        out_mask[:nh, :nw] = resize_mask(mask, (nh, nw))
    else:
        raise ValueError(f"aspect must be 'squash' or 'pad', got {aspect!r}")
    check_mask(out_mask)
    # HWC -> CHW in numpy: the copy stays off torch's intra-op thread pool, which the training process shares.
    chw = np.ascontiguousarray(out_image.transpose(2, 0, 1))
    return torch.from_numpy(chw), torch.from_numpy(out_mask if out_mask.flags.writeable else out_mask.copy())
