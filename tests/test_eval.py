"""`python -m dualrl.eval`: RefCOCO-protocol cIoU / gIoU, caption METEOR and cycle IoU, from a run or a
model directory, on RefCOCO-format data or the built-in shapes."""

from __future__ import annotations

import json

import pytest
import torch

from dualrl.algo.losses import mask_iou
from dualrl.data.scenes import ShapesDataset
from dualrl.eval import evaluate_model, main
from tests.data.make_refcoco import make_refcoco


def test_ciou_and_giou_follow_the_refcoco_protocol(tiny_model):
    """Every reference sentence is a query; gIoU averages per-query IoUs, cIoU divides total areas."""
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
    assert got["ref_giou"] == pytest.approx(sum(ious) / len(ious), abs=1e-5)
    assert got["ref_ciou"] == pytest.approx(inter / union, abs=1e-5)
    assert got["regions"] == 3 and 0.0 <= got["cycle_miou"] <= 1.0


def test_cli_on_a_model_directory_and_shapes(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "recipes/pretrained/shapes-tiny",
                "--data",
                "shapes",
                "--split",
                "test",
                "--max-regions",
                "6",
                "--batch-size",
                "4",
                "--out",
                str(out),
                "model.max_caption_tokens=6",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["regions"] == 6 and result["data"] == "shapes" and result["split"] == "test"
    for key in ("ref_ciou", "ref_giou", "cycle_miou"):
        assert 0.0 <= result[key] <= 1.0
    assert result["ref_giou"] > 0.2  # the pretrained tiny checkpoint segments shapes (0.49 mIoU on val)
    assert "ref cIoU" in capsys.readouterr().out


def test_cli_on_a_run_with_refcoco_data(tmp_path):
    from dualrl.recipe import load_recipe
    from dualrl.train import run
    from tests.conftest import TINY

    run(
        load_recipe(
            "recipes/sft_dual.yaml", [*TINY, f"output_dir={tmp_path / 'run'}", "train.steps=1", "eval.at_start=false"]
        )
    )
    refer, images = make_refcoco(tmp_path / "refer")
    out = tmp_path / "e.json"
    args = [
        str(tmp_path / "run"),
        "--data",
        "refcoco",
        f"data.refcoco.root={refer}",
        f"data.refcoco.images={images}",
        "--out",
        str(out),
        "--weights",
        "policy",
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["regions"] == 1 and result["queries"] == 1 and result["weights"] == "policy"
    assert main([str(tmp_path / "nowhere"), "--data", "shapes"]) == 2
    assert main([str(tmp_path / "run"), "--data", "refcoco"]) == 2  # no refcoco paths given


def test_cli_on_a_sa2va_directory(tiny_model, tmp_path):
    from dualrl.model.sa2va_format import save_sa2va

    save_sa2va(tiny_model, tiny_model.tokenizer, tmp_path / "sa2va")
    out = tmp_path / "e.json"
    assert (
        main(
            [
                str(tmp_path / "sa2va"),
                "--data",
                "shapes",
                "--max-regions",
                "2",
                "--out",
                str(out),
                "model.sam.image_size=128",
                "model.multimask=false",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["regions"] == 2


@pytest.mark.parametrize("aspect", ["squash", "pad"])
def test_refcoco_ious_are_at_the_file_resolution(tiny_model, tmp_path, aspect):
    """The RefCOCO protocol compares masks at each image's own size (here 48 x 64, working square 128): the
    logits go back from the square (cropped first when padded), and the annotation's mask is not resized."""
    from dualrl.eval import regions
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
