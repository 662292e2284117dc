"""`python -m dualrl.launch RECIPE.yaml [dotted.key=value ...]` — validate the recipe, then train.

Everything about the recipe (unknown keys, bad values, missing files) and what the run needs of this machine (a
writable output_dir, the device, a model that builds, a Ray head that answers) is checked before any model is built
or file written; a problem ends the command with one `error:` line naming the key and what is allowed, and exit 2.
`python -m dualrl.launch RECIPE.yaml [dotted.key=value ...] --help` prints every key of that recipe (type,
default, value, help) and stops.
"""

from __future__ import annotations

import logging
import sys

from dualrl.recipe import RecipeError, check_launch, check_paths, check_rewards, load_recipe, resolve_recipe
from dualrl.recipe.cli import ArgumentParser, fail
from dualrl.recipe.help import describe_recipe


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dualrl.launch",
        usage="%(prog)s [-h] recipe [overrides ...]",
        description=__doc__.splitlines()[0],
        add_help=False,  # -h after a recipe prints that recipe's keys (see `recipe_help`)
    )
    parser.add_argument("recipe", nargs="?", help="path to a YAML recipe, e.g. recipes/sft_dual.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, later ones win")
    parser.add_argument(
        "-h",
        "--help",
        action="store_true",
        help="show this help message and exit; with a recipe: every key of that recipe with its type, default, "
        "value in the recipe and help",
    )
    return parser


def recipe_help(path: str, overrides: list[str]) -> int:
    """Print every key of the recipe (after `extends` and overrides); build, train and write nothing."""
    try:
        recipe = resolve_recipe(path, overrides)
    except RecipeError as err:
        return fail(err)
    print(describe_recipe(recipe, title=" ".join([path, *overrides])), end="")
    try:  # what a run would refuse, said after the keys rather than instead of them
        check_paths(recipe)
        check_rewards(recipe)
    except RecipeError as err:
        print(f"\nnote: this recipe does not start as it stands: {err}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.help:
        if args.recipe is None:
            parser.print_help()
            return 0
        return recipe_help(args.recipe, args.overrides)
    if args.recipe is None:
        parser.error("the following arguments are required: recipe")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_launch(recipe)
    except RecipeError as err:
        return fail(err)
    from dualrl.runtime import ActorLost, ActorTimeout
    from dualrl.train import TrainingDiverged, run  # heavy imports only once the recipe is known to be good

    try:
        summary = run(recipe)
    except (TrainingDiverged, ActorTimeout, ActorLost) as err:  # diverged, an actor late or dead: one line
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RecipeError as err:  # a resume refused (changed keys, no intact checkpoint): nothing was built or written
        return fail(err)
    if not summary["complete"]:
        print(
            f"stopped at step {summary['steps']} of {recipe.train.steps} after {summary['wall_time_s']:.0f} s; "
            "run the same command again to resume"
        )
        return 0
    print(f"done: {summary['steps']} steps in {summary['wall_time_s']:.0f} s; final {summary['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
