"""`python -m dualrl.export RUN_DIR DEST [--weights ema|policy] [--dtype float16]` — turn a run's latest
checkpoint into a dualrl model directory that another recipe can start from (`model.pretrained: DEST`).

The run's resolved recipe (`RUN_DIR/recipe.yaml`) says how to build the model; the checkpoint's trainable
weights (the student's or their EMA) are loaded into it and the whole model is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dualrl.checkpoint import load_latest
from dualrl.model.build import build_model, save_pretrained
from dualrl.recipe import RecipeError, load_recipe


def export(run_dir: Path, dest: Path, weights: str = "ema", dtype: str = "float32") -> Path:
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.model.trainable.lora:
        raise RecipeError("export of LoRA runs needs the adapters merged; this exporter takes full-weight runs")
    state = load_latest(run_dir)
    if state is None:
        raise RecipeError(f"no checkpoint under {run_dir / 'checkpoints'}")
    learner_state, run_state = state
    model = build_model(recipe.model)
    model.load_trainable(learner_state["ema" if weights == "ema" else "model"])
    save_pretrained(model, dest, getattr(torch, dtype))
    (Path(dest) / "SOURCE.txt").write_text(
        f"exported from {run_dir} at step {run_state['step']} ({weights} weights, {dtype})\n")
    return Path(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualrl.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--weights", choices=["ema", "policy"], default="ema")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    try:
        path = export(args.run_dir, args.dest, args.weights, args.dtype)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
