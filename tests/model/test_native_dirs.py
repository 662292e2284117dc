"""Building from a transformers-native InternVL directory and an official-format SAM2 checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dualrl.model.build import build_model
from dualrl.recipe import RecipeError, load_recipe
from tests.conftest import TINY


def _spec(*overrides):
    return load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", "model.trainable.lora=false", *overrides]).model


def test_native_vlm_directory_and_sam_checkpoint(tmp_path):
    source = build_model(_spec()).eval()
    source.vlm.save_pretrained(str(tmp_path / "vlm"))
    source.tokenizer.save_pretrained(str(tmp_path / "vlm"))
    torch.save({"model": source.sam.state_dict()}, tmp_path / "sam.pt")  # the official SAM2 checkpoint form
    model = build_model(
        _spec(f"model.vlm={tmp_path / 'vlm'}", f"model.sam.checkpoint={tmp_path / 'sam.pt'}", "model.seed=5")
    ).eval()
    for (name, a), (_, b) in zip(source.vlm.state_dict().items(), model.vlm.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(source.sam.state_dict().items(), model.sam.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model.vlm(input_ids=ids).logits, source.vlm(input_ids=ids).logits)
    save_file(source.sam.state_dict(), str(tmp_path / "sam.safetensors"))
    build_model(_spec(f"model.sam.checkpoint={tmp_path / 'sam.safetensors'}"))


def test_mismatches_are_named(tmp_path):
    source = build_model(_spec()).eval()
    source.vlm.save_pretrained(str(tmp_path / "vlm"))
    source.tokenizer.save_pretrained(str(tmp_path / "vlm"))
    with pytest.raises(RecipeError, match=r"model\.text\.layers: recipe 3 vs checkpoint 2"):
        build_model(_spec(f"model.vlm={tmp_path / 'vlm'}", "model.text.layers=3"))
    with pytest.raises(
        RecipeError, match=r"model\.text\.arch: recipe 'internlm2' vs checkpoint 'qwen2' .*a qwen2 model"
    ):
        build_model(_spec(f"model.vlm={tmp_path / 'vlm'}", "model.text.arch=internlm2"))
    state = source.sam.state_dict()
    state.pop(next(iter(state)))
    torch.save({"model": state}, tmp_path / "sam.pt")
    with pytest.raises(ValueError, match=r"does not fit model\.sam\.config.*missing"):
        build_model(_spec(f"model.sam.checkpoint={tmp_path / 'sam.pt'}"))
    with pytest.raises(RecipeError, match="exclusive"):
        load_recipe("recipes/sft_dual.yaml", ["output_dir=x", f"model.vlm={tmp_path / 'vlm'}"])
    with pytest.raises(RecipeError, match=r"model\.vlm: no transformers model directory"):
        load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=x", f"model.vlm={tmp_path}"])
