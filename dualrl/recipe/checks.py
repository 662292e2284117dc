"""Checks of what a validated recipe names outside itself: files and folders that must exist, reward plugins that
must be found and take the options given. Run by `load_recipe` before any model is built."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dualrl.recipe.section import RecipeError

if TYPE_CHECKING:
    from dualrl.recipe.data import DataSpec
    from dualrl.recipe.schema import Recipe


def check_paths(recipe: Recipe) -> None:
    """Files the recipe names must exist before anything is built."""
    pretrained = recipe.model.pretrained
    if pretrained is not None and not (Path(pretrained) / "model.safetensors").is_file():
        raise RecipeError(
            f"model.pretrained: no dualrl model at {pretrained!r} (expected model.safetensors "
            "there). Build it with `python -m dualrl.launch recipes/pretrain_tiny.yaml` or set "
            "model.pretrained=null to start from random init."
        )
    if sum(x is not None for x in (pretrained, recipe.model.sa2va, recipe.model.vlm)) > 1:
        raise RecipeError("model.pretrained, model.sa2va and model.vlm are exclusive: set one of them")
    vlm = recipe.model.vlm
    if vlm is not None and not (Path(vlm).expanduser() / "config.json").is_file():
        raise RecipeError(f"model.vlm: no transformers model directory at {vlm!r} (expected config.json there)")
    sa2va = recipe.model.sa2va
    if sa2va is not None:
        if pretrained is not None:
            raise RecipeError("model.sa2va and model.pretrained are exclusive: set one of them")
        folder = Path(sa2va).expanduser()
        if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise RecipeError(
                f"model.sa2va: no Sa2VA checkpoint at {sa2va!r} (expected model.safetensors or "
                "model.safetensors.index.json there)"
            )
    ckpt = recipe.model.sam.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        raise RecipeError(f"model.sam.checkpoint: file not found: {ckpt!r}")
    if recipe.model.init_from is not None:
        from dualrl.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(recipe.model.init_from)
        except FileNotFoundError as err:
            raise RecipeError(f"model.init_from: {err}") from None
    check_data_paths(recipe.data)


# Recipe keys of each source that name files or folders, and what is expected there.
DATA_PATHS = {
    "refcoco": {
        "root": "the folder of refcoco/, refcoco+/, refcocog/ (instances.json + refs(*).p)",
        "images": "the COCO train2014 image folder",
    },
    "sa1b": {"root": "the SA-1B folder (sa_*.jpg + sa_*.json, or their extracted tar folders)"},
    "sav": {"root": "the SA-V folder (sav_*.mp4 + sav_*_manual.json, or .npz frame pairs)"},
    "openimages": {
        "annotations": "train-annotations-object-segmentation.csv",
        "classes": "oidv7-class-descriptions.csv",
        "images": "the folder of <ImageID>.jpg",
        "masks": "the folder of mask PNGs or train-masks-<c>.zip files",
    },
}


def check_data_paths(data: DataSpec) -> None:
    """Every data path of an enabled source exists; the message names the recipe key."""
    for name, keys in DATA_PATHS.items():
        spec = getattr(data, name)
        if spec is None or (spec.weight == 0 and not (name == "refcoco" and data.eval_source != "shapes")):
            continue
        for key, what in keys.items():
            path = Path(getattr(spec, key)).expanduser()
            if not path.exists():
                raise RecipeError(
                    f"data.{name}.{key}: {what} not found at '{path}'. Set it in the recipe or "
                    f"with data.{name}.{key}=/path/to/it, or switch the source off with "
                    f"data.{name}=null."
                )


def check_rewards(recipe: Recipe) -> None:
    """Every reward plugin can be found and takes the options the recipe gives it."""
    from rewards.registry import RewardConfigError, resolve_plugin

    for i, spec in enumerate(recipe.rewards):
        try:
            resolve_plugin(spec)
        except RewardConfigError as err:
            raise RecipeError(f"rewards[{i}] ({spec.key}): {err}") from None
