"""sft_dual end to end on a mixture of format-exact fixtures of all four real sources (with their broken
samples in place): the run goes on, counts what it skipped, evaluates on RefCOCO val, and resumes exactly."""

from __future__ import annotations

import json

import pytest

from dualrl.recipe import RecipeError, load_recipe
from dualrl.train import run
from tests.conftest import TINY
from tests.data.make_openimages import make_openimages
from tests.data.make_refcoco import make_refcoco
from tests.data.make_sa1b import make_sa1b
from tests.data.make_sav import write_npz, write_video_sample


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    refer, images = make_refcoco(root / "refer")
    make_sa1b(root / "sa1b", images=3)
    write_video_sample(root / "sav" / "sav_000", "sav_000001")
    write_video_sample(root / "sav" / "sav_000", "sav_000002")
    write_npz(root / "sav" / "pairs" / "pair_0.npz")
    oi = make_openimages(root / "oi", zipped=True)
    return [
        "data.shapes=null",
        f"data.refcoco.root={refer}",
        f"data.refcoco.images={images}",
        f"data.sa1b.root={root / 'sa1b'}",
        "data.sa1b.min_area=100",
        f"data.sav.root={root / 'sav'}",
        "data.sav.min_area=20",
        "data.sav.pair_gap=1",
        *(f"data.openimages.{k}={v}" for k, v in oi.items()),
        "data.openimages.min_area=4",
        "data.image_size=64",
        f"data.cache_dir={root / 'cache'}",
        "data.all_bad_after=200",
    ]


def _run(out, fixtures, *extra):
    recipe = load_recipe(
        "recipes/full_data/sft_dual_mixture.yaml",
        [
            *TINY,
            *fixtures,
            f"output_dir={out}",
            "model.pretrained=null",
            "model.max_caption_tokens=6",
            "model.trainable.lora_r=8",
            "model.trainable.lora_alpha=16",
            "algo.loss.num_points=256",
            "data.batch_size=6",
            "data.num_workers=0",
            "eval.batch_size=8",
            "optim.lr=1e-4",
            *extra,
        ],
    )
    return run(recipe)


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_dual_runs_on_all_four_sources(tmp_path, fixtures):
    out = tmp_path / "run"
    summary = _run(out, fixtures, "train.steps=4", "eval.every=4")
    last = [m for m in _lines(out) if "train/loss" in m][-1]
    for name in ("refcoco", "sa1b", "sav", "openimages"):
        assert last[f"data/samples/{name}"] > 0, name
    assert last["data/position"] > 4 * 6  # skipped samples were drawn and replaced
    assert summary["data_skipped"]["annotation_corrupt"] >= 3  # the broken OpenImages CSV lines
    load_time = {"image_missing", "image_corrupt", "empty_mask", "full_mask", "mask_missing", "mask_too_small"}
    assert load_time & set(summary["data_skipped"])
    assert last["data/skipped_total"] == sum(summary["data_skipped"].values())
    final = summary["final"]
    assert 0.0 <= final["eval/ref_miou"] <= 1.0 and "eval/cycle_miou" in final


def test_mixture_run_resumes_without_replaying_or_skipping(tmp_path, fixtures):
    steps = ["train.steps=4", "eval.every=4", "train.save_every=2", "eval.at_start=false"]
    _run(tmp_path / "whole", fixtures, *steps)
    _run(tmp_path / "split", fixtures, *steps, "train.stop_at_step=2")
    _run(tmp_path / "split", fixtures, *steps)
    whole, split = _lines(tmp_path / "whole"), _lines(tmp_path / "split")
    assert [m["step"] for m in whole] == [m["step"] for m in split]
    for a, b in zip(whole, split):
        for key in a:
            if key.startswith("sync/") or key.endswith("/ms"):
                continue
            if key.startswith("data/skipped"):
                continue  # load-time skips are restored; index-time ones count the shards this process read
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_missing_paths_name_their_recipe_key(fixtures):
    with pytest.raises(RecipeError, match=r"data.sa1b.root: the SA-1B folder .* not found at '/nope'"):
        load_recipe("recipes/full_data/sft_dual_mixture.yaml", [*TINY, *fixtures, "data.sa1b.root=/nope"])
    with pytest.raises(RecipeError, match=r"data.openimages.masks: .* not found"):
        load_recipe("recipes/full_data/sft_dual_mixture.yaml", [*TINY, *fixtures, "data.openimages.masks=/nope"])


def test_index_command_builds_every_shard_in_parallel(tmp_path, fixtures, capsys):
    from dualrl.data.index import main

    overrides = [*TINY, *[f for f in fixtures if not f.startswith("data.cache_dir")], f"data.cache_dir={tmp_path}"]
    assert main(["recipes/full_data/sft_dual_mixture.yaml", *overrides, "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"refcoco", "sa1b", "sav", "openimages"}
    assert report["sa1b"] == {
        "shards": 1,
        "samples": 6,
        "skipped": {"mask_too_small": 3},
        "seconds": report["sa1b"]["seconds"],
    }
    assert report["openimages"]["skipped"]["annotation_corrupt"] == 3
    assert {p.parent.name for p in tmp_path.rglob("*.npz")} == {"sa1b", "sav", "openimages"}  # refcoco: in memory


def test_full_data_recipe_builds_its_model_as_written(fixtures):
    """The recipe's model section matches the checkpoint it names (only the data paths are overridden)."""
    from dualrl.model.build import build_model

    recipe = load_recipe("recipes/full_data/sft_dual_mixture.yaml", [*fixtures, "output_dir=unused"])
    assert recipe.optim.lr == 1e-5 and recipe.algo.ema_decay == 0.999  # (the fixtures set image_size 64)
    build_model(recipe.model)
