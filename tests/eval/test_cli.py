"""`python -m dualrl.eval`: a run, a model directory or a Sa2VA directory evaluated on RefCOCO-format data or the
built-in shapes; the JSON and the printed table use the metric names of docs/eval.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dualrl.eval.cli import main
from tests.data.make_refcoco import make_refcoco


def test_cli_on_a_model_directory_and_shapes(tmp_path, capsys, documented_names):
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
    for key in ("ref_miou", "ref_ciou", "cycle_miou", "meteor"):
        assert 0.0 <= result[key] <= 1.0
    assert result["ref_miou"] > 0.2  # the pretrained tiny checkpoint segments shapes (0.66 mIoU on 256 val regions)
    printed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()[:7])
    assert float(printed["ref_miou"]) == pytest.approx(result["ref_miou"], abs=1e-4)
    numbers = {k for k, v in result.items() if isinstance(v, (int, float))} - {"seconds"}
    assert numbers <= documented_names  # the names of the evaluation during training, in docs/eval.md


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


def test_bad_arguments_are_one_error_line(capsys):
    assert main(["recipes/pretrained/shapes-tiny", "--data", "shapes", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size must be at least 1\n"
    assert main(["recipes/pretrained/shapes-tiny", "--data", "shapes", "--max-regions", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-regions must be at least 1 (leave it out for the whole split)\n"


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "dualrl.eval", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m dualrl.eval ")
