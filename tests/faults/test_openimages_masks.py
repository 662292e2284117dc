"""OpenImages masks: one of another aspect ratio than its image is skipped (`mask_aspect_mismatch`), not
stretched onto it; the `masks` path may name the folder above the published `train/` folder."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualrl.data.decode import BadSample
from dualrl.data.sources.openimages import OpenImagesSource, same_aspect
from dualrl.recipe import OpenImagesSpec

HEADER = b"MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"
LABEL = "/m/04yx4"


def mask_name(image_id: str) -> str:
    return f"{image_id}_{LABEL.replace('/', '')}_b0.png"


def png(h: int, w: int) -> bytes:
    """A mask of h x w (rows x columns) whose left half is foreground."""
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")
    return buf.getvalue()


def write_openimages(root: Path, images: dict[str, tuple[int, int]]) -> dict[str, str]:
    """The class and annotation CSVs and one JPEG of (h, w) per image id; masks are the caller's."""
    (root / "images").mkdir(parents=True)
    (root / "oidv7-class-descriptions.csv").write_text(f"LabelName,DisplayName\n{LABEL},Man\n")
    rows = [f"{mask_name(i)},{i},{LABEL},b0,0.1,0.5,0.2,0.6,0.9,\n".encode() for i in images]
    (root / "train-annotations-object-segmentation.csv").write_bytes(HEADER + b"".join(rows))
    for image_id, (h, w) in images.items():
        Image.new("RGB", (w, h), (90, 120, 30)).save(root / "images" / f"{image_id}.jpg")
    return {
        "annotations": str(root / "train-annotations-object-segmentation.csv"),
        "classes": str(root / "oidv7-class-descriptions.csv"),
        "images": str(root / "images"),
        "masks": str(root / "masks"),
    }


def loaded(paths: dict[str, str]) -> dict[str, object]:
    """Image id -> its sample's mask area at the working size, or the reason it was skipped."""
    source = OpenImagesSource(OpenImagesSpec(**paths, min_area=10), size=16)
    shard = source.build_shard("0")
    out = {}
    for i in range(len(shard)):
        key = source.key(shard, "0", i)
        try:
            sample = source.load(key, seed=0)
            out[sample["index"].split(":")[0]] = int(sample["mask"].sum())
        except BadSample as bad:
            out[f"row {i}"] = bad.reason
    return out


@pytest.mark.parametrize(
    ("mask_hw", "image_hw", "same"),
    [
        ((30, 40), (60, 80), True),  # half size
        ((38, 50), (75, 100), True),  # 37.5 rounded up: |38*100 - 50*75| = 50 < 175
        ((37, 50), (75, 100), True),  # ... or down: 50 < 175
        ((80, 60), (60, 80), False),  # transposed: |80*80 - 60*60| = 2800
        ((30, 45), (60, 80), False),  # 2:3 on 3:4: |30*80 - 45*60| = 300 >= 140
        ((2, 3), (3, 2), False),  # tiny and transposed: |2*2 - 3*3| = 5, not < 5
    ],
)
def test_same_aspect(mask_hw, image_hw, same):
    assert same_aspect(mask_hw, image_hw) is same


def test_a_mask_of_another_aspect_ratio_is_skipped_not_stretched(tmp_path):
    paths = write_openimages(tmp_path, {"0a": (60, 80), "0b": (60, 80), "0c": (75, 100)})
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / mask_name("0a")).write_bytes(png(30, 40))  # half size: fine
    (masks / mask_name("0b")).write_bytes(png(80, 60))  # portrait mask on a landscape image
    (masks / mask_name("0c")).write_bytes(png(38, 50))  # rounded: fine
    assert loaded(paths) == {"0a": 8 * 16, "row 1": "mask_aspect_mismatch", "0c": 8 * 16}


def test_masks_root_may_be_the_folder_above_the_published_train_folder(tmp_path):
    """`<masks>/train/train-masks-<c>.zip` as published, or extracted `<masks>/train/<MaskPath>`."""
    paths = write_openimages(tmp_path, {"1a": (60, 80), "2b": (60, 80), "3c": (60, 80)})
    train = tmp_path / "masks" / "train"
    train.mkdir(parents=True)
    with zipfile.ZipFile(train / "train-masks-1.zip", "w") as z:
        z.writestr(mask_name("1a"), png(30, 40))
    with zipfile.ZipFile(train / "train-masks-2.zip", "w") as z:
        z.writestr(f"train-masks-2/{mask_name('2b')}", png(30, 40))
    (train / mask_name("3c")).write_bytes(png(30, 40))
    assert loaded(paths) == {"1a": 8 * 16, "2b": 8 * 16, "3c": 8 * 16}
    paths["masks"] = str(train)  # the train folder itself, as before
    assert loaded(paths) == {"1a": 8 * 16, "2b": 8 * 16, "3c": 8 * 16}


def test_a_mask_in_neither_place_names_both(tmp_path):
    paths = write_openimages(tmp_path, {"4d": (60, 80)})
    (tmp_path / "masks" / "train").mkdir(parents=True)
    source = OpenImagesSource(OpenImagesSpec(**paths, min_area=10), size=16)
    with pytest.raises(BadSample, match=r"masks \(or its train-masks-4.zip\) nor in .*masks/train") as bad:
        source.load(source.key(source.build_shard("0"), "0", 0), seed=0)
    assert bad.value.reason == "mask_missing"
