import itertools

import numpy as np
import pytest
import torch

from dualrl.data.scenes import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    collate_regions,
    draw_scene,
    fade,
    render_expression,
)


def _scenes(n: int, seed: int = 0, **kwargs) -> list:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng, **kwargs) for _ in range(n)]


def _parse(text: str) -> dict[str, str]:
    """Read attributes back from an expression, independently of how the module renders them."""
    assert text.startswith("the "), text
    parsed = {}
    for position in sorted(POSITIONS, key=len, reverse=True):
        for prep in ("at", "in", "on"):
            suffix = f" {prep} the {position}"
            if text.endswith(suffix):
                parsed["position"] = position
                text = text[: -len(suffix)]
                break
        if "position" in parsed:
            break
    words = text.split()[1:]
    noun = words.pop()
    if noun != "object":
        assert noun in SHAPES, text
        parsed["shape"] = noun
    for word in words:
        key = "size" if word in SIZES else "colour"
        assert word in SIZES or word in COLOURS, text
        parsed[key] = word
    return parsed


def _matches(obj, attrs: dict[str, str]) -> bool:
    return all(obj.attributes[k] == v for k, v in attrs.items())


def test_same_index_is_deterministic():
    """Two datasets with the same arguments give identical image, mask and text for every index."""
    a, b = (
        ShapesDataset("train", 20, expression_fraction=0.5),
        ShapesDataset("train", 20, expression_fraction=0.5),
    )
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert (x["expression"], x["references"], x["attributes"]) == (
            y["expression"],
            y["references"],
            y["attributes"],
        )


def test_splits_and_seeds_give_different_scenes():
    """The same index in another split, or under another base seed, draws a different scene."""
    images = {
        key: [ds[i]["image"] for i in range(10)]
        for key, ds in {
            "train": ShapesDataset("train", 10),
            "val": ShapesDataset("val", 10),
            "test": ShapesDataset("test", 10),
            "select": ShapesDataset("select", 10),
            "train1": ShapesDataset("train", 10, seed=1),
        }.items()
    }
    for (k1, imgs1), (k2, imgs2) in itertools.combinations(images.items(), 2):
        for x in imgs1:
            assert not any(torch.equal(x, y) for y in imgs2), (k1, k2)


def test_item_is_one_object_of_its_scene():
    """An item's image is its scene's image, and its mask and attributes are those of one scene object."""
    ds = ShapesDataset("val", 10, image_size=96)
    for i in range(10):
        item, scene = ds[i], ds.scene(i)
        assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
        assert item["mask"].shape == (96, 96) and item["mask"].dtype == torch.bool
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), scene.image)
        j = next(j for j, m in enumerate(scene.masks) if np.array_equal(m, item["mask"].numpy()))
        assert item["attributes"] == scene.objects[j].attributes
        assert item["expression"] == scene.objects[j].canonical == item["references"][0]
        assert item["source"] == "shapes" and item["index"] == i


def test_masks_are_exactly_the_visible_pixels_of_each_colour():
    """Without noise, every mask pixel has its object's colour, and each colour's pixels are exactly the
    union of the masks of objects with that colour; all other pixels are the background colour."""
    for scene in _scenes(30, noise=0):
        covered = scene.masks.any(0)
        assert (scene.image[~covered] == scene.background).all()
        for name, rgb in COLOURS.items():
            of_colour = (scene.image == rgb).all(-1)
            union = np.zeros_like(covered)
            for obj, mask in zip(scene.objects, scene.masks):
                if obj.colour == name:
                    union |= mask
            assert np.array_equal(of_colour, union), name


def test_colours_are_distinct_from_each_other_and_the_background():
    """Object colours are pairwise far apart in RGB, and far from every drawn background."""
    rgbs = np.array(list(COLOURS.values()), dtype=float)
    for a, b in itertools.combinations(rgbs, 2):
        assert np.linalg.norm(a - b) > 100
    for scene in _scenes(50):
        assert np.linalg.norm(rgbs - np.array(scene.background), axis=1).min() > 100


def test_masks_are_disjoint_and_clearly_visible():
    """Masks of one scene never overlap, and each keeps >= 60% of its full area and a minimum size."""
    for scene in _scenes(60, seed=1):
        assert 1 <= len(scene.objects) <= 6
        assert scene.masks.sum(0).max() <= 1
        for obj, mask in zip(scene.objects, scene.masks):
            assert obj.area == mask.sum() >= 100
            assert obj.area >= 0.6 * obj.full_area


def test_position_word_matches_mask_centroid_with_margin():
    """The position word is the 3x3 thirds cell of the mask centroid, which keeps clear of the cell lines."""
    for size in (64, 128):
        for scene in _scenes(40, seed=2, image_size=size):
            third = size / 3
            for obj, mask in zip(scene.objects, scene.masks):
                ys, xs = np.nonzero(mask)
                x, y = xs.mean(), ys.mean()
                assert np.allclose(obj.centroid, (x, y))
                col, row = int(x // third), int(y // third)
                assert obj.position == POSITIONS[3 * row + col]
                for v in (x, y):
                    assert min(abs(v - third), abs(v - 2 * third)) >= 0.04 * size - 1e-6


def test_sizes_are_separated_by_area():
    """Every small object's full area is below every large object's, whatever their shapes."""
    small, large = [], []
    for scene in _scenes(100, seed=3):
        for obj in scene.objects:
            (small if obj.size == "small" else large).append(obj.full_area)
    assert max(small) < min(large)


def test_same_colour_objects_never_touch():
    """Objects sharing a colour are not 8-connected, so their masks can be told apart in the image."""
    for size in (64, 128):
        for scene in _scenes(60, seed=4, image_size=size):
            for (a, ma), (b, mb) in itertools.combinations(zip(scene.objects, scene.masks), 2):
                if a.colour == b.colour:
                    padded = np.pad(ma, 1)
                    grown = np.zeros_like(ma)
                    for dy, dx in itertools.product(range(3), repeat=2):
                        grown |= padded[dy : dy + size, dx : dx + size]
                    assert not (grown & mb).any()


def test_expressions_are_unique_and_every_reference_is_unambiguous():
    """Canonical expressions are unique per scene and come first; every reference, parsed back into
    attributes, matches exactly its own object, and dropping any attribute of a variant makes it ambiguous."""
    for scene in _scenes(60, seed=5):
        canon = [o.canonical for o in scene.objects]
        assert len(set(canon)) == len(canon)
        for obj in scene.objects:
            assert obj.references[0] == obj.canonical == render_expression(obj.attributes)
            assert _parse(obj.canonical) == obj.attributes
            assert len(set(obj.references)) == len(obj.references)
            for ref in obj.references:
                attrs = _parse(ref)
                assert [o for o in scene.objects if _matches(o, attrs)] == [obj], ref
                if ref == obj.canonical:
                    continue
                for drop in attrs:
                    smaller = {k: v for k, v in attrs.items() if k != drop}
                    assert not smaller or sum(_matches(o, smaller) for o in scene.objects) > 1, ref


def test_render_expression_is_grammatical():
    """Hand-checked renderings, including "in the center", "on the left" and the generic noun."""
    full = {"size": "small", "colour": "blue", "shape": "triangle", "position": "top left"}
    assert render_expression(full) == "the small blue triangle at the top left"
    assert render_expression({**full, "position": "center"}) == "the small blue triangle in the center"
    assert render_expression({"colour": "red", "position": "left"}) == "the red object on the left"
    assert render_expression({"shape": "circle"}) == "the circle"
    assert set(ATTRIBUTES) == set(full)
    with pytest.raises(ValueError):
        render_expression({})


def test_expression_fraction_is_honoured():
    """About the requested fraction of items carry text; 0 and 1 are exact; mask-only items have no refs."""
    n = 500
    ds = ShapesDataset("train", n, image_size=64, expression_fraction=0.3)
    items = [ds[i] for i in range(n)]
    with_text = [it["expression"] is not None for it in items]
    assert 0.22 * n <= sum(with_text) <= 0.38 * n
    assert all(bool(it["references"]) == has for it, has in zip(items, with_text))
    for fraction in (0.0, 1.0):
        ds = ShapesDataset("train", 100, image_size=64, expression_fraction=fraction)
        assert all((ds[i]["expression"] is not None) == (fraction == 1.0) for i in range(100))


def test_fade_scales_the_contrast_about_the_mean():
    """Contrast 1 returns the image itself; contrast c keeps the mean grey and scales every pixel's distance
    from it by c (to rounding), so the image's spread shrinks by c."""
    image = ShapesDataset("val", 1).scene(0).image
    assert fade(image, 1.0) is image
    faded = fade(image, 0.4)
    assert faded.dtype == np.uint8 and faded.shape == image.shape
    mean = image.mean()
    assert abs(faded.mean() - mean) < 0.5
    np.testing.assert_allclose(faded.astype(float) - mean, 0.4 * (image.astype(float) - mean), atol=0.51)
    assert faded.std() == pytest.approx(0.4 * image.std(), rel=0.01)


def test_referred_contrast_fades_only_the_regions_without_text():
    """With contrast 0.5 and referred_contrast 1, the items that carry text are the plain dataset's items and
    the mask-only ones are its items faded; scenes, objects, masks and texts stay the plain dataset's."""
    plain = ShapesDataset("train", 40, image_size=64, expression_fraction=0.5)
    mixed = ShapesDataset("train", 40, image_size=64, expression_fraction=0.5, contrast=0.5, referred_contrast=1.0)
    kinds = set()
    for i in range(40):
        a, b = plain[i], mixed[i]
        assert torch.equal(a["mask"], b["mask"]) and a["expression"] == b["expression"]
        assert a["references"] == b["references"] and a["attributes"] == b["attributes"]
        has_text = a["expression"] is not None
        kinds.add(has_text)
        want = a["image"] if has_text else torch.from_numpy(fade(a["image"].permute(1, 2, 0).numpy(), 0.5))
        assert torch.equal(b["image"], want if has_text else want.permute(2, 0, 1))
    assert kinds == {True, False}  # both kinds were checked
    held_out, faded = ShapesDataset("val", 4), ShapesDataset("val", 4, contrast=0.5)
    for i in range(4):  # every held-out item (all carry text) at `contrast`, and its scene too
        want = fade(held_out[i]["image"].permute(1, 2, 0).numpy(), 0.5)
        assert np.array_equal(faded[i]["image"].permute(1, 2, 0).numpy(), want)
        assert np.array_equal(faded.scene(i).image, fade(held_out.scene(i).image, 0.5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "dev"},
        {"size": 0},
        {"seed": -1},
        {"image_size": 32},
        {"expression_fraction": -0.1},
        {"expression_fraction": 1.5},
        {"expression_fraction": float("nan")},
        {"min_objects": 0},
        {"min_objects": 4, "max_objects": 3},
        {"max_objects": 7},
        {"noise": -1},
        {"contrast": 0.0},
        {"contrast": 1.5},
        {"referred_contrast": float("nan")},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs):
    """Each bad argument is rejected up front with a ValueError."""
    args = {"split": "train", "size": 10, **kwargs}
    with pytest.raises(ValueError):
        ShapesDataset(**args)


def test_out_of_range_index_raises_index_error():
    """Indexing past the end raises IndexError, which ends plain iteration over the dataset."""
    ds = ShapesDataset("test", 3)
    with pytest.raises(IndexError):
        ds[3]
    assert len(list(ds)) == 3


def test_collate_regions_stacks_tensors_and_keeps_lists():
    """Images stack to [B, 3, H, W], masks to [B, H, W]; the other keys become lists in item order."""
    ds = ShapesDataset("train", 4, image_size=64, expression_fraction=0.5)
    batch = collate_regions([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["masks"].shape == (4, 64, 64) and batch["masks"].dtype == torch.bool
    assert batch["index"] == [0, 1, 2, 3] and batch["source"] == ["shapes"] * 4
    assert len(batch["expression"]) == len(batch["references"]) == len(batch["attributes"]) == 4
    with pytest.raises(ValueError):
        collate_regions([])
