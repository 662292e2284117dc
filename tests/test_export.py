"""`python -m dualrl.export`: a LoRA run out as a Sa2VA directory (read back by model.sa2va) or a PEFT adapter."""

from __future__ import annotations

import torch

from dualrl.export import main
from dualrl.model.build import build_model
from dualrl.recipe import load_recipe
from dualrl.train import run
from tests.conftest import TINY


def test_lora_run_exports_to_sa2va_and_peft(tmp_path, region_batch, capsys):
    out = tmp_path / "run"
    run(
        load_recipe(
            "recipes/sft_dual.yaml",
            [*TINY, f"output_dir={out}", "train.steps=2", "eval.at_start=false", "optim.lr=1e-2"],
        )
    )
    assert main([str(out), str(tmp_path / "plain")]) == 2
    assert "--format sa2va" in capsys.readouterr().err
    assert main([str(out), str(tmp_path / "sa2va"), "--format", "sa2va"]) == 0
    assert main([str(out), str(tmp_path / "peft"), "--format", "peft", "--weights", "policy"]) == 0
    assert {p.name for p in (tmp_path / "peft").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "dualrl_heads.safetensors",
    }
    trained = build_model(load_recipe(out / "recipe.yaml", [f"model.init_from={out}"]).model).eval()
    exported = build_model(
        load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", f"model.sa2va={tmp_path / 'sa2va'}"]).model
    ).eval()
    fresh = build_model(load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x"]).model).eval()
    with torch.no_grad():
        want = trained.segment(region_batch["images"], region_batch["expression"])[0]
        got = exported.segment(region_batch["images"], region_batch["expression"])[0]
        untrained = fresh.segment(region_batch["images"], region_batch["expression"])[0]
    assert (want - untrained).abs().max() > 1e-3  # two steps at lr 1e-2 moved the EMA
    assert (want - got).abs().max() < 1e-4
