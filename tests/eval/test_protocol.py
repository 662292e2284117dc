"""`dualrl.eval.protocol.evaluate_model`: the RefCOCO protocol (every sentence a query; `ref_miou` averages
per-query IoUs, `ref_ciou` divides total areas), at the working square or at each file's resolution."""

from __future__ import annotations

import pytest
import torch

from dualrl.algo.losses import mask_iou
from dualrl.data.scenes import ShapesDataset
from dualrl.eval.protocol import evaluate_model
from tests.data.make_refcoco import make_refcoco


def test_ref_miou_and_ref_ciou_follow_the_refcoco_protocol(tiny_model):
    """Every reference sentence is a query; `ref_miou` averages per-query IoUs, `ref_ciou` divides total areas."""
    samples = [ShapesDataset("val", 8)[i] for i in range(3)]
    got = evaluate_model(tiny_model, iter(samples), batch_size=2)
    inter, union, ious = 0.0, 0.0, []
    for s in samples:
        for sentence in s["references"]:
            logits, *_ = tiny_model.segment(s["image"][None], [sentence])
            up = torch.nn.functional.interpolate(logits[:, None], size=s["mask"].shape, mode="bilinear")[0, 0] > 0
            inter += (up & s["mask"]).sum().item()
            union += (up | s["mask"]).sum().item()
            ious.append(mask_iou(logits, s["mask"][None]).item())
    assert got["queries"] == len(ious) == sum(len(s["references"]) for s in samples)
    assert got["ref_miou"] == pytest.approx(sum(ious) / len(ious), abs=1e-5)
    assert got["ref_ciou"] == pytest.approx(inter / union, abs=1e-5)
    assert got["regions"] == 3 and 0.0 <= got["cycle_miou"] <= 1.0


@pytest.mark.parametrize("aspect", ["squash", "pad"])
def test_refcoco_ious_are_at_the_file_resolution(tiny_model, tmp_path, aspect):
    """The RefCOCO protocol compares masks at each image's own size (here 48 x 64, working square 128): the
    logits go back from the square (cropped first when padded), and the annotation's mask is not resized."""
    from dualrl.eval.inputs import regions
    from dualrl.recipe import load_recipe
    from tests.conftest import TINY

    refer, images = make_refcoco(tmp_path / "refer")
    recipe = load_recipe(
        "recipes/sft_dual.yaml",
        [
            *TINY,
            "output_dir=x",
            f"data.refcoco.root={refer}",
            f"data.refcoco.images={images}",
            "data.refcoco.eval_split=train",
            f"data.aspect={aspect}",
            "data.image_size=128",
        ],
    )
    samples = list(regions(recipe, "refcoco", "train", None))
    assert [s["full_mask"].shape for s in samples] == [(48, 64)] * 2
    got = evaluate_model(tiny_model, iter(samples), 2, aspect)
    inter = union = 0
    for s in samples:
        for sentence in s["references"]:
            logits, *_ = tiny_model.segment(s["image"][None], [sentence])
            up = logits[:, None]
            if aspect == "pad":  # 64 wide -> 128: the image fills the top 96 rows of the square
                up = torch.nn.functional.interpolate(up, size=(128, 128), mode="bilinear")[..., :96, :]
            pred = torch.nn.functional.interpolate(up, size=(48, 64), mode="bilinear")[0, 0] > 0
            gt = torch.from_numpy(s["full_mask"])
            inter += (pred & gt).sum().item()
            union += (pred | gt).sum().item()
    assert got["ref_ciou"] == pytest.approx(inter / union, abs=1e-6)
    working = evaluate_model(tiny_model, iter({k: v for k, v in s.items() if k != "full_mask"} for s in samples), 2)
    assert working["queries"] == got["queries"] == 3
