"""Decoding images, masks and text of real datasets, and squaring regions: every broken form named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dualrl.data.decode import (
    REASONS,
    BadSample,
    check_mask,
    clean_text,
    polygon_mask,
    read_image,
    read_mask_png,
    rle_counts,
    rle_mask,
)
from dualrl.data.transforms import PAD_COLOUR, resize_mask, square


def _png(arr, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def _reason(fn, *args, **kw) -> str:
    with pytest.raises(BadSample) as err:
        fn(*args, **kw)
    assert err.value.reason in REASONS
    return err.value.reason


def test_rle_counts_inverts_pycocotools_and_rle_mask_decodes():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        m = rng.random((h, w)) < rng.random()
        enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert sum(rle_counts(enc["counts"])) == h * w
        assert (rle_mask({"size": [h, w], "counts": enc["counts"].decode()}) == m).all()


def test_malformed_rle_is_refused_not_decoded_into_garbage():
    assert _reason(rle_mask, {"size": [10, 10], "counts": "PPP"}) == "bad_rle"  # runs do not add up
    assert _reason(rle_mask, {"size": [10, 10], "counts": "0 1"}) == "bad_rle"  # outside the alphabet
    assert _reason(rle_mask, {"size": [10, 10], "counts": [50, 60]}) == "bad_rle"  # list sums to 110
    assert _reason(rle_mask, {"size": [10, 10], "counts": [-5, 105]}) == "bad_rle"
    assert _reason(rle_mask, {"counts": "PPP"}) == "bad_rle"
    assert _reason(rle_mask, {"size": [10, 10], "counts": 7}) == "bad_rle"
    ok = {"size": [10, 10], "counts": [40, 20, 40]}
    assert rle_mask(ok).sum() == 20
    assert _reason(rle_mask, ok, 10, 12) == "mask_size_mismatch"


def test_polygons_drop_degenerate_parts():
    square_poly = [0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]
    assert polygon_mask([square_poly, [1.0, 1.0, 5.0, 5.0]], 20, 20).sum() == polygon_mask([square_poly], 20, 20).sum()
    assert _reason(polygon_mask, [[1.0, 1.0, 5.0, 5.0]], 20, 20) == "bad_polygon"  # a box, not a polygon
    assert _reason(polygon_mask, [[0.0, 0.0, float("nan"), 1.0, 2.0, 2.0]], 20, 20) == "bad_polygon"
    assert _reason(polygon_mask, [["a", "b"]], 20, 20) == "bad_polygon"
    assert _reason(polygon_mask, "nope", 20, 20) == "bad_polygon"
    assert _reason(polygon_mask, [[0.0, 0.0, 1.0]], 20, 20) == "bad_polygon"


def test_check_mask_rejects_empty_full_and_small():
    assert _reason(check_mask, np.zeros((4, 4), bool)) == "empty_mask"
    assert _reason(check_mask, np.ones((4, 4), bool)) == "full_mask"
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    assert _reason(check_mask, m, min_area=2) == "mask_too_small"
    assert check_mask(m) is m


def test_images_of_every_mode_become_rgb8():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
    assert (read_image(_png(rgb), 10**6) == rgb).all()
    gray = rgb[..., 0]
    assert (read_image(_png(gray), 10**6) == gray[..., None]).all()
    rgba = np.dstack([rgb, np.full((6, 5), 7, np.uint8)])
    assert (read_image(_png(rgba), 10**6) == rgb).all()
    wide = gray.astype(np.uint16) * 257  # 16-bit: scaled, not clipped to 255
    got = read_image(_png(wide), 10**6)
    assert got.dtype == np.uint8 and (got[..., 0] == gray).all()
    pal = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert read_image(buf.getvalue(), 10**6).shape == (6, 5, 3)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    assert read_image(cmyk.getvalue(), 10**6).shape == (6, 5, 3)


def test_exif_orientation_is_not_applied(tmp_path):
    """Annotations are drawn on the stored pixels; a reader that rotated would swap h and w."""
    img = Image.fromarray(np.zeros((30, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert read_image(path, 10**6, expect_hw=(30, 20)).shape == (30, 20, 3)


def test_broken_images(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 99).save(good, format="JPEG")
    assert _reason(read_image, good.getvalue()[:200], 10**6) == "image_corrupt"  # truncated
    assert _reason(read_image, b"GIF89a nonsense", 10**6) == "image_corrupt"
    assert _reason(read_image, b"", 10**6) == "image_corrupt"
    assert _reason(read_image, tmp_path / "none.jpg", 10**6) == "image_missing"
    assert _reason(read_image, good.getvalue(), 100) == "image_too_large"  # from the header
    assert _reason(read_image, good.getvalue(), 10**6, expect_hw=(40, 41)) == "mask_size_mismatch"
    huge = io.BytesIO()
    Image.new("1", (30000, 30000)).save(huge, format="PNG")  # 900 M pixels, a few kB on disk
    assert _reason(read_image, huge.getvalue(), 64_000_000) == "image_too_large"


def test_mask_pngs():
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:4] = 255
    assert read_mask_png(_png(m)).sum() == 4
    assert read_mask_png(_png(m > 0)).sum() == 4  # 1-bit
    assert _reason(read_mask_png, b"\x89PNG\r\n\x1a\n broken") == "mask_missing"


def test_clean_text():
    assert clean_text(b"the man \xc3\xa9 ") == "the man é"
    assert clean_text(b"\xff\xfe") is None
    assert clean_text("  \t\n") is None and clean_text(None) is None and clean_text(3) is None
    assert clean_text("a\x00b\u200bc") == "a b c"


def test_square_policies_and_tiny_masks():
    image = np.zeros((40, 80, 3), np.uint8)
    mask = np.zeros((40, 80), bool)
    mask[10:30, 0:40] = True  # the left half
    img, m = square(image, mask, 32, "squash")
    assert img.shape == (3, 32, 32) and m[8:24, :16].all() and m.sum() == 16 * 16  # rows 10-30 of 40 -> 8-24
    img, m = square(image, mask, 32, "pad")
    assert (img[:, 20:, :] == np.array(PAD_COLOUR)[:, None, None]).all()  # bottom padding
    assert not m[16:].any() and m[4:12, :16].all() and m.sum() == 8 * 16  # 80x40 -> 32x16 at the top
    tiny = np.zeros((400, 400), bool)
    tiny[100, 100] = True  # one pixel of 400x400 at 32x32 covers 1/156 of a cell: kept, not lost
    assert resize_mask(tiny, (32, 32)).sum() == 1
    assert _reason(square, np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool), 8) == "full_mask"
    assert _reason(square, np.zeros((4, 5, 3), np.uint8), np.ones((4, 4), bool), 8) == "mask_size_mismatch"
