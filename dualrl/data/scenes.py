"""Built-in procedural referring dataset ``shapes``: coloured shapes with exact masks and unambiguous text.

Each scene is a square RGB image of 1-6 shapes on a uniform noisy background. Every object has four
attributes (size, colour, shape, position) and a canonical expression such as "the small blue triangle at
the top left" that is unique in its scene; its shorter references ("the blue triangle", "the triangle at the
top left") are the minimal attribute subsets that still pick out exactly that object. Masks are the visible
pixels: objects drawn later occlude earlier ones, and a scene is only kept when every object stays clearly
visible and its position word is never borderline. Everything derives from a numpy Generator, so a
(split, index) pair always yields the same sample on every machine, and a tiny model can train on a CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dualrl.data.batch import collate_regions  # noqa: F401  (re-exported: the shapes tests and tools use it)

# Saturated and far apart in RGB (pairwise L2 > 100), and far from the grey backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 40),
    "green": (40, 175, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 230, 50),
    "purple": (160, 50, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
# Row-major over the 3x3 grid of image thirds, so POSITIONS[3 * row + col].
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
SPLITS = ("train", "val", "test", "select")  # appended: the codes of the first three never change
ATTRIBUTES = ("size", "colour", "shape", "position")

# Radii in px at 128 px, scaled with image_size. The gap (13 -> 20) keeps the largest small shape at less
# than half the area of the smallest large one whatever the two shapes are.
_RADIUS_RANGE = {"small": (9.0, 13.0), "large": (20.0, 27.0)}
# Per shape, in units of the radius: (half width, extent above the centroid, extent below it). The factors
# keep the areas within ~20% of a circle's, and the triangle's apex low enough that a large one still fits
# in the top row with its centroid clear of the margin.
_EXTENT = {
    "circle": (1.0, 1.0, 1.0),
    "square": (0.9, 0.9, 0.9),
    "triangle": (1.4, 1.3, 0.65),
    "diamond": (1.2, 1.2, 1.2),
}
# 0.65 r (the triangle's centroid-to-base distance) is the smallest centroid-to-edge distance over the
# shapes, so growing r by gap / 0.65 pushes every edge out by at least the gap.
_MIN_EDGE_DISTANCE = 0.65
_MIN_VISIBLE_FRACTION = 0.6
_MIN_VISIBLE_PIXELS = 100.0  # at 128 px, scaled with area
_POSITION_MARGIN = 0.04  # of image_size: centroids stay this far from the lines between thirds
_SAME_COLOUR_GAP = 2.0  # px, > sqrt(2): same-coloured objects never touch, else their masks would look merged
_ATTEMPTS_PER_OBJECT = 30
_MAX_RESTARTS = 100
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its attributes, how much of it shows, and its referring expressions."""

    size: str
    colour: str
    shape: str
    position: str
    centroid: tuple[float, float]  # (x, y) of the visible pixels
    area: int  # visible pixels
    full_area: int  # pixels before occlusion
    canonical: str
    references: list[str]  # [canonical, *minimal unique variants]

    @property
    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [N, H, W], visible pixels, pairwise disjoint
    objects: list[SceneObject]
    background: tuple[int, int, int]


def render_expression(attributes: Mapping[str, str]) -> str:
    """Words for any non-empty subset of the attributes; the noun is "object" when the shape is left out."""
    if not any(attributes.get(a) for a in ATTRIBUTES):
        raise ValueError(f"render_expression needs at least one of {ATTRIBUTES}, got {dict(attributes)}")
    words = ["the"]
    words += [attributes[a] for a in ("size", "colour") if attributes.get(a)]
    words.append(attributes.get("shape") or "object")
    position = attributes.get("position")
    if position:
        if position == "center":
            words.append("in the center")
        elif position in ("left", "right"):
            words.append(f"on the {position}")  # "at the left" reads wrong; corners and edges take "at"
        else:
            words.append(f"at the {position}")
    return " ".join(words)


def position_of(x: float, y: float, image_size: int) -> str:
    """Position word of a point (pixel coordinates) in the 3x3 grid of image thirds."""
    third = image_size / 3
    col, row = (min(max(int(v // third), 0), 2) for v in (x, y))
    return POSITIONS[3 * row + col]


def draw_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 6,
    noise: int = 8,
) -> Scene:
    """Draw one scene; `noise` is the amplitude of the uniform per-pixel, per-channel integer noise."""
    _check_scene_args(image_size, min_objects, max_objects, noise)
    for _ in range(_MAX_RESTARTS):
        n = int(rng.integers(min_objects, max_objects + 1))
        layout = _Layout(image_size)
        if all(layout.add(rng) for _ in range(n)):
            return layout.render(rng, noise)
    raise RuntimeError(f"could not place {min_objects}-{max_objects} objects at image_size={image_size}")


def fade(image: np.ndarray, contrast: float) -> np.ndarray:
    """`image` (uint8 [H, W, C]) with its contrast scaled by `contrast` about its mean grey: 1 leaves it as it is,
    less washes it out, as a camera with another exposure or a hazy scene would."""
    if contrast == 1.0:
        return image
    mean = float(image.mean())
    faded = np.rint(mean + contrast * (image.astype(np.float32) - mean))
    return np.clip(faded, 0, 255).astype(np.uint8)


def _check_contrast(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_scene_args(image_size: int, min_objects: int, max_objects: int, noise: int) -> None:
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 (shapes get too small to name), got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if max_objects > 6:
        raise ValueError(f"max_objects must be <= 6 (more rarely fit clearly visible), got {max_objects}")
    if not 0 <= noise <= 64:
        raise ValueError(f"noise must be in [0, 64], got {noise}")


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside test on offsets from the centroid (dx [1, w], dy [h, 1]; y grows downwards)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    half_width, up, down = (e * r for e in _EXTENT[shape])
    if shape == "square":
        return (np.abs(dx) <= half_width) & (np.abs(dy) <= half_width)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half_width
    # Triangle with the apex up: the half width grows linearly from 0 at the apex to half_width at the base.
    return (dy <= down) & (np.abs(dx) * (up + down) <= half_width * (dy + up))


class _Layout:
    """A scene under construction: a label map of the top-most object per pixel plus running mask stats."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.scale = image_size / 128
        self.third = image_size / 3
        self.margin = _POSITION_MARGIN * image_size
        self.min_pixels = _MIN_VISIBLE_PIXELS * self.scale**2
        self.label = np.full((image_size, image_size), -1, dtype=np.int8)
        self.attrs: list[tuple[str, str, str, str]] = []  # (size, colour, shape, position), as ATTRIBUTES
        self.full_area: list[int] = []
        # Visible area and coordinate sums per object, so occlusion updates centroids without a full rescan.
        self.area = np.zeros(0, dtype=np.float64)
        self.sum_x = np.zeros(0, dtype=np.float64)
        self.sum_y = np.zeros(0, dtype=np.float64)

    def add(self, rng: np.random.Generator) -> bool:
        """Try to place one more object keeping every invariant; False if no attempt succeeded."""
        for _ in range(_ATTEMPTS_PER_OBJECT):
            size = SIZES[rng.integers(len(SIZES))]
            colour = _COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            cell = int(rng.integers(len(POSITIONS)))
            attrs = (size, colour, shape, POSITIONS[cell])
            if attrs in self.attrs:
                continue  # the canonical expression must stay unique
            r = rng.uniform(*_RADIUS_RANGE[size]) * self.scale
            half_width, up, down = (e * r for e in _EXTENT[shape])
            row, col = divmod(cell, 3)
            cx = self._sample_coord(rng, col, half_width, half_width)
            cy = self._sample_coord(rng, row, up, down)
            if cx is not None and cy is not None and self._place(attrs, r, cx, cy):
                return True
        return False

    def _sample_coord(self, rng: np.random.Generator, band: int, before: float, after: float) -> float | None:
        # A slightly wider margin than the check, so pixelisation rarely pushes the centroid over it.
        lo = max(band * self.third + 1.25 * self.margin, before)
        hi = min((band + 1) * self.third - 1.25 * self.margin, self.image_size - 1 - after)
        return float(rng.uniform(lo, hi)) if lo <= hi else None

    def _footprint(self, shape: str, r: float, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (ys, xs) covered by the shape, computed inside its bounding box only."""
        half_width, up, down = (e * r for e in _EXTENT[shape])
        n = self.image_size
        x0, x1 = max(0, math.floor(cx - half_width)), min(n, math.ceil(cx + half_width) + 1)
        y0, y1 = max(0, math.floor(cy - up)), min(n, math.ceil(cy + down) + 1)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        ys, xs = np.nonzero(_shape_mask(shape, dx, dy, r))
        return ys + y0, xs + x0

    def _cell_of(self, x: float, y: float) -> str | None:
        """Position word of a centroid, or None when it lies within the margin of a line between thirds."""
        for v in (x, y):
            offset = v % self.third
            near_line_below = v >= self.third and offset < self.margin
            near_line_above = v < 2 * self.third and self.third - offset < self.margin
            if near_line_below or near_line_above:
                return None
        return position_of(x, y, self.image_size)

    def _place(self, attrs: tuple[str, str, str, str], r: float, cx: float, cy: float) -> bool:
        shape, colour = attrs[2], attrs[1]
        ys, xs = self._footprint(shape, r, cx, cy)
        if ys.size < self.min_pixels or self._cell_of(xs.mean(), ys.mean()) != attrs[3]:
            return False
        same_colour = [j for j, a in enumerate(self.attrs) if a[1] == colour]
        if same_colour:
            gys, gxs = self._footprint(shape, r + _SAME_COLOUR_GAP / _MIN_EDGE_DISTANCE, cx, cy)
            if np.isin(self.label[gys, gxs], same_colour).any():
                return False
        # What the new object hides of each earlier one, by label.
        covered = self.label[ys, xs]
        hidden = covered >= 0
        k = len(self.attrs)
        lost = np.bincount(covered[hidden], minlength=k)
        area = self.area - lost
        sum_x = self.sum_x - np.bincount(covered[hidden], weights=xs[hidden], minlength=k)
        sum_y = self.sum_y - np.bincount(covered[hidden], weights=ys[hidden], minlength=k)
        for j in np.flatnonzero(lost):
            if area[j] < max(self.min_pixels, _MIN_VISIBLE_FRACTION * self.full_area[j]):
                return False
            if self._cell_of(sum_x[j] / area[j], sum_y[j] / area[j]) != self.attrs[j][3]:
                return False
        self.label[ys, xs] = k
        self.attrs.append(attrs)
        self.full_area.append(int(ys.size))
        self.area = np.append(area, ys.size)
        self.sum_x = np.append(sum_x, xs.sum())
        self.sum_y = np.append(sum_y, ys.sum())
        return True

    def render(self, rng: np.random.Generator, noise: int) -> Scene:
        # Grey, dark or light, with a small tint: far from every saturated object colour.
        base = rng.integers(20, 71) if rng.random() < 0.5 else rng.integers(185, 236)
        red, green, blue = (int(c) for c in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
        background = (red, green, blue)
        palette = np.array([background] + [COLOURS[a[1]] for a in self.attrs], dtype=np.int16)
        image = palette[self.label.astype(np.intp) + 1]
        if noise:
            image += rng.integers(-noise, noise + 1, size=image.shape, dtype=np.int16)
        image = np.clip(image, 0, 255).astype(np.uint8)
        masks = self.label[None] == np.arange(len(self.attrs), dtype=np.int8)[:, None, None]
        objects = []
        for j, (size, colour, shape, position) in enumerate(self.attrs):
            refs = _references(self.attrs, j)
            objects.append(
                SceneObject(
                    size=size,
                    colour=colour,
                    shape=shape,
                    position=position,
                    centroid=(float(self.sum_x[j] / self.area[j]), float(self.sum_y[j] / self.area[j])),
                    area=int(self.area[j]),
                    full_area=self.full_area[j],
                    canonical=refs[0],
                    references=refs,
                )
            )
        return Scene(image=image, masks=masks, objects=objects, background=background)


def _references(attrs: list[tuple[str, str, str, str]], j: int) -> list[str]:
    """[canonical, *variants]: the variants name the minimal attribute subsets unique to object j."""
    target = attrs[j]
    minimal: list[set[int]] = []
    for k in range(1, len(ATTRIBUTES)):
        for subset in itertools.combinations(range(len(ATTRIBUTES)), k):
            if any(m <= set(subset) for m in minimal):
                continue  # a smaller subset already identifies it
            matches = sum(all(other[a] == target[a] for a in subset) for other in attrs)
            if matches == 1:
                minimal.append(set(subset))
    names = [dict(zip(ATTRIBUTES, target))]
    names += [{ATTRIBUTES[a]: target[a] for a in sorted(m)} for m in minimal]
    return list(dict.fromkeys(render_expression(n) for n in names))


class ShapesDataset(Dataset):
    """Regions of procedural scenes: item i is one object of scene (split, i), with or without its text.

    `expression_fraction` of the items carry the canonical expression and its references; the rest are
    mask-only (expression None, references []), like SA-1B. Which items carry text is fixed per index, and
    the set only grows with the fraction, so the scene and object of an item never depend on it.

    `contrast` washes every image out (`fade`); `referred_contrast`, when given, is the contrast of the items
    that carry text instead, so that text and mask-only items can come from two looks of the same scenes.
    """

    def __init__(
        self,
        split: str,
        size: int,
        image_size: int = 128,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        expression_fraction: float = 1.0,
        noise: int = 8,
        regions_per_scene: int = 1,
        contrast: float = 1.0,
        referred_contrast: float | None = None,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= expression_fraction <= 1.0:  # also rejects NaN
            raise ValueError(f"expression_fraction must be in [0, 1], got {expression_fraction}")
        if regions_per_scene < 1:
            raise ValueError(f"regions_per_scene must be >= 1, got {regions_per_scene}")
        _check_scene_args(image_size, min_objects, max_objects, noise)
        _check_contrast("contrast", contrast)
        _check_contrast("referred_contrast", referred_contrast)
        self.contrast, self.referred_contrast = contrast, referred_contrast
        self.regions_per_scene = regions_per_scene
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.min_objects, self.max_objects, self.noise = min_objects, max_objects, noise
        self.expression_fraction = expression_fraction

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
        # The spawn key keeps (split, index) streams independent and disjoint across splits.
        seq = np.random.SeedSequence(self.seed, spawn_key=(_SPLIT_CODES[self.split], index))
        return np.random.default_rng(seq)

    def scene(self, index: int) -> Scene:
        """The whole scene behind item `index`, at the dataset's `contrast` (an item with text under
        `referred_contrast` shows it at that contrast instead)."""
        scene = draw_scene(
            self._rng(index // self.regions_per_scene), self.image_size, self.min_objects, self.max_objects, self.noise
        )
        return dataclasses.replace(scene, image=fade(scene.image, self.contrast))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
        # `regions_per_scene` consecutive items are different objects of one scene (cycling when it has
        # fewer), as Sa2VA packs several referred objects per image: one image, several queries.
        k = self.regions_per_scene
        rng = self._rng(index // k)
        scene = draw_scene(rng, self.image_size, self.min_objects, self.max_objects, self.noise)
        # Drawn after the scene from the same stream, so neither choice changes the scene.
        order = rng.permutation(len(scene.objects))
        text_draws = rng.random(k)
        obj = int(order[(index % k) % len(order)])
        has_text = text_draws[index % k] < self.expression_fraction
        target = scene.objects[obj]
        referred = has_text and self.referred_contrast is not None
        image = fade(scene.image, self.referred_contrast if referred else self.contrast)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(scene.masks[obj]),
            "expression": target.canonical if has_text else None,
            "references": list(target.references) if has_text else [],
            "attributes": target.attributes,
            "source": "shapes",
            "index": index,
        }
