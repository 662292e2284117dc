"""Typed recipes: the YAML a run is described by, mirrored by pydantic models.

Every field carries its type, default and help text in one place, the section's module:

- `model.py` — `model:` (architecture, weights, trainable set, prompts, decoding)
- `data.py` — `data:` (sources and their mixture, working size, loader)
- `algo.py` — `algo:` (the objective, its losses, the EMA teacher)
- `run.py` — `optim:`, `train:`, `eval:`, `runtime:`, `wandb:` and the `rewards:` entries
- `schema.py` — the whole `Recipe`, its derived keys (`DERIVED`) and its cross-section checks

`load.py` reads files (`extends`), applies `dotted.key=value` overrides and validates; `checks.py` checks the
files and plugins a recipe names, and what a launch needs of the machine; `help.py` prints every key (`python -m
dualrl.launch RECIPE --help`); `cli.py` is what the command lines share (one `error:` line, exit 2).
"""

from dualrl.recipe.algo import AlgoSpec, GrpoSpec, LossSpec, PretrainSpec, SftDualSpec
from dualrl.recipe.checks import (
    DATA_PATHS,
    check_data_paths,
    check_launch,
    check_model,
    check_paths,
    check_rewards,
    check_writable_folder,
)
from dualrl.recipe.data import (
    DataSpec,
    OpenImagesSpec,
    RefCocoSpec,
    Sa1bSpec,
    SavSpec,
    ShapesSpec,
    SourceSpec,
)
from dualrl.recipe.load import dump_recipe, load_recipe, parse_override, resolve_recipe
from dualrl.recipe.model import (
    NANO_SAM_OVERRIDES,
    ModelSpec,
    PromptSpec,
    SamSpec,
    TextSpec,
    TrainableSpec,
    VisionSpec,
)
from dualrl.recipe.run import EvalSpec, OptimSpec, RewardSpec, RuntimeSpec, TrainSpec, WandbSpec
from dualrl.recipe.schema import DERIVED, Recipe
from dualrl.recipe.section import RecipeError, Section

__all__ = [
    "DATA_PATHS",
    "DERIVED",
    "NANO_SAM_OVERRIDES",
    "AlgoSpec",
    "DataSpec",
    "EvalSpec",
    "GrpoSpec",
    "LossSpec",
    "ModelSpec",
    "OpenImagesSpec",
    "OptimSpec",
    "PretrainSpec",
    "PromptSpec",
    "Recipe",
    "RecipeError",
    "RefCocoSpec",
    "RewardSpec",
    "RuntimeSpec",
    "Sa1bSpec",
    "SamSpec",
    "SavSpec",
    "Section",
    "SftDualSpec",
    "ShapesSpec",
    "SourceSpec",
    "TextSpec",
    "TrainSpec",
    "TrainableSpec",
    "VisionSpec",
    "WandbSpec",
    "check_data_paths",
    "check_launch",
    "check_model",
    "check_paths",
    "check_rewards",
    "check_writable_folder",
    "dump_recipe",
    "load_recipe",
    "parse_override",
    "resolve_recipe",
]
