"""`python -m dualrl.gallery`: held-out regions captioned and segmented back, by the model a run started from and
by its latest EMA weights."""

from __future__ import annotations

import torch

from dualrl.gallery import cycle, main


def test_gallery_of_a_run_shows_start_and_end(tmp_path, capsys):
    from dualrl.recipe import load_recipe
    from dualrl.train import run
    from tests.conftest import TINY

    run(
        load_recipe(
            "recipes/sft_dual.yaml",
            [*TINY, f"output_dir={tmp_path / 'run'}", "train.steps=2", "eval.at_start=false", "optim.lr=0.05"],
        )
    )
    out = tmp_path / "g.png"
    assert main([str(tmp_path / "run"), "--regions", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    lines = [x for x in capsys.readouterr().out.splitlines() if x[:2] in ("0:", "1:")]
    assert len(lines) == 2 and all("start: " in x and "end: " in x for x in lines)


def test_cycle_masks_are_the_segmentation_of_the_models_own_captions(tiny_model, region_batch):
    captions, masks = cycle(tiny_model, region_batch)
    assert len(captions) == len(region_batch["images"]) and masks.shape == region_batch["masks"].shape
    with torch.no_grad():
        logits, *_ = tiny_model.segment(region_batch["images"], captions)
    up = torch.nn.functional.interpolate(logits.float()[:, None], size=masks.shape[-2:], mode="bilinear")[:, 0] > 0
    assert torch.equal(up, masks)


def test_not_a_run_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
