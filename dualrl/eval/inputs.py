"""What the command line evaluates: the model a checkpoint describes, and the held-out regions of a split."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from dualrl.data.loader import SkipLog, build_source, in_file_order
from dualrl.recipe import Recipe, RecipeError, ShapesSpec, load_recipe

log = logging.getLogger("dualrl.eval")

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sft_dual.yaml"


def eval_recipe(checkpoint: Path, overrides: list[str], weights: str, recipe: Path | None = None) -> Recipe:
    """The recipe a checkpoint's model is built with, the checkpoint's weights on top. A model directory
    (dualrl's arch.json, or a Sa2VA checkpoint's config.json) is built with `recipe`'s model section."""
    base = recipe or DEFAULT_RECIPE
    if (checkpoint / "arch.json").is_file():
        return load_recipe(base, [f"model.pretrained={checkpoint}", "output_dir=unused", *overrides])
    if (checkpoint / "config.json").is_file():
        return load_recipe(
            base, ["model.pretrained=null", f"model.sa2va={checkpoint}", "output_dir=unused", *overrides]
        )
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / "recipe.yaml").is_file():
            return load_recipe(
                folder / "recipe.yaml", [f"model.init_from={checkpoint}", f"model.init_weights={weights}", *overrides]
            )
    raise RecipeError(
        f"{checkpoint}: neither a model directory (dualrl's arch.json or a Sa2VA config.json) "
        "nor a training run (recipe.yaml in it or two folders up)"
    )


def regions(recipe: Recipe, data: str, split: str, limit: int | None, full_masks: bool = True) -> Iterator[dict]:
    """Good samples of the split in file order (bad ones skipped, counted and logged once per reason), with
    their masks at the file's resolution when `full_masks`."""
    spec = getattr(recipe.data, data) or (ShapesSpec() if data == "shapes" else None)
    if spec is None:
        raise RecipeError(f"--data {data}: set data.{data}.* (its paths) in the recipe or as overrides")
    if data == "refcoco":
        spec = spec.model_copy(update={"eval_split": split})
    skips = SkipLog()
    yield from in_file_order(
        build_source(data, spec, recipe.data, recipe.model.sam.image_size, split="val" if data == "refcoco" else split),
        skips,
        limit,
        full_masks=full_masks,
    )
    if skips.counts:
        log.warning("skipped %s", skips.counts)
