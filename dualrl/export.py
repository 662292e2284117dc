"""`python -m dualrl.export RUN_DIR DEST [--format dualrl|sa2va|peft] [--weights ema|policy] [--dtype ...]` —
turn a run's newest intact checkpoint into something other tools load.

- `dualrl`: a dualrl model directory another recipe starts from (`model.pretrained: DEST`); full-weight runs.
- `sa2va`: the Sa2VA Hugging Face layout (LoRA merged, new token rows included, config.json, tokenizer), which
  `model.sa2va: DEST` reads back (`dualrl/model/sa2va_format.py`).
- `peft`: a PEFT adapter for the native InternVL model plus the other trained weights
  (`dualrl/model/adapters.py`); LoRA runs only.

The run's resolved recipe (`RUN_DIR/recipe.yaml`) says how to build the model; the checkpoint's trainable
weights (the student's or their EMA) are loaded into it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dualrl.checkpoint import load_latest
from dualrl.model.build import build_model, save_pretrained
from dualrl.recipe import RecipeError, check_model, check_writable_folder, load_recipe
from dualrl.recipe.cli import ArgumentParser, fail

FORMATS = ("dualrl", "sa2va", "peft")


def export(run_dir: Path, dest: Path, weights: str = "ema", dtype: str = "float32", fmt: str = "dualrl") -> Path:
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(
            f"RUN_DIR {str(run_dir)!r} is not a training run (no recipe.yaml in it): give a run's output_dir"
        )
    check_dest(Path(dest), run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    check_model(recipe.model)
    if fmt == "dualrl" and recipe.model.trainable.lora:
        raise RecipeError(
            "a LoRA run exports with its adapters merged in the Sa2VA layout (--format sa2va) or as "
            "a PEFT adapter (--format peft); --format dualrl takes full-weight runs"
        )
    if fmt == "peft" and not recipe.model.trainable.lora:
        raise RecipeError("--format peft needs a LoRA run (model.trainable.lora: true)")
    state = load_latest(run_dir)  # the newest intact step; a bad newer one is named in the log, the fallback said
    if state is None:
        raise RecipeError(f"no checkpoint under {run_dir / 'checkpoints'}")
    learner_state, run_state = state
    model = build_model(recipe.model)
    model.load_trainable(learner_state["ema" if weights == "ema" else "model"])
    if fmt == "sa2va":
        from dualrl.model.sa2va_format import save_sa2va

        save_sa2va(model, model.tokenizer, dest, dtype=getattr(torch, dtype))
    elif fmt == "peft":
        from dualrl.model.adapters import save_peft_adapter

        save_peft_adapter(model, dest, getattr(torch, dtype))
    else:
        save_pretrained(model, dest, getattr(torch, dtype))
    (Path(dest) / "SOURCE.txt").write_text(
        f"exported from {run_dir} at step {run_state['step']} ({weights} weights, {dtype}, {fmt} format)\n"
    )
    return Path(dest)


def check_dest(dest: Path, run_dir: Path) -> None:
    """DEST is a new folder, an empty one or an earlier export (SOURCE.txt), which the export replaces; never a folder
    of other files (the run's own among them), which replacing would delete."""
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "SOURCE.txt").is_file():
        where = "the run itself" if dest.resolve() == run_dir.resolve() else "a folder of other files"
        raise RecipeError(f"DEST {str(dest)!r} is {where}, which the export would replace; give a new or empty folder")
    check_writable_folder(dest, "DEST")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m dualrl.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--weights", choices=["ema", "policy"], default="ema")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--format", choices=FORMATS, default="dualrl")
    args = parser.parse_args(argv)
    try:
        path = export(args.run_dir, args.dest, args.weights, args.dtype, args.format)
    except RecipeError as err:
        return fail(err)
    print(f"wrote {path} ({(path / 'SOURCE.txt').read_text().strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
