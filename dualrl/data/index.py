"""Build the shard indexes of a recipe's data ahead of training, in parallel, and report what was found.

    python -m dualrl.data.index RECIPE.yaml [dotted.key=value ...] [--workers N]

Training builds a shard's index when the stream first reaches it, in the training process; at SA-1B
scale (1,000 shards of ~11 k JSON files) that is better done once beforehand with every core. The indexes
land in `data.cache_dir`, where training finds them. Prints, per source: shards, samples, and the samples
skipped while indexing, by reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from dualrl.data.loader import build_source, enabled
from dualrl.recipe import Recipe, RecipeError, load_recipe


def _index(args: tuple) -> tuple[str, int, dict[str, int]]:
    source, shard = args
    built = source.shard_index(shard)
    return shard, len(built), built.skipped


def build_indexes(recipe: Recipe, workers: int = 1) -> dict[str, dict]:
    report = {}
    for name, spec in enabled(recipe.data):
        source = build_source(name, spec, recipe.data, recipe.model.sam.image_size)
        shards = source.shards()
        t0 = time.time()
        samples, skipped = 0, {}
        jobs = [(source, s) for s in shards]
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_index, jobs))
        else:
            results = [_index(j) for j in jobs]
        for _, n, skips in results:
            samples += n
            for reason, k in skips.items():
                skipped[reason] = skipped.get(reason, 0) + k
        report[name] = {
            "shards": len(shards),
            "samples": samples,
            "skipped": skipped,
            "seconds": round(time.time() - t0, 2),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualrl.data.index", description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(build_indexes(recipe, args.workers), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
