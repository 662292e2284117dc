"""`python -m dualrl.launch RECIPE.yaml [dotted.key=value ...]` — validate the recipe, then train.

Everything about the recipe (unknown keys, bad values, missing files) is checked before any model is
built; a problem ends the command with one message naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dualrl.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualrl.launch", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/sft_dual.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, later ones win")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dualrl.train import run  # heavy imports only once the recipe is known to be good

    summary = run(recipe)
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
