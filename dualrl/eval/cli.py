"""`python -m dualrl.eval CHECKPOINT [dotted.key=value ...]` — evaluate a model on held-out regions.

CHECKPOINT is a training run (its output_dir, checkpoints/ folder or one step_N folder: the run's
recipe.yaml says how to build the model, the checkpoint's EMA or student weights go into it), a dualrl
model directory (model.safetensors + arch.json) or a Sa2VA Hugging Face directory (config.json +
safetensors + tokenizer); a directory is built with the model section of `--recipe` (default
`recipes/sft_dual.yaml`).
Overrides apply to that recipe, e.g. `data.refcoco.root=/data/refer data.refcoco.images=/data/coco/train2014`.

On `--data refcoco` (a RefCOCO/+/g split in the `refer` layout) or `--data shapes`, it reports `ref_miou` and
`ref_ciou` (referring segmentation, RefCOCO protocol), `meteor` (region captions) and `cycle_miou` (the model
segmenting its own captions): the names the evaluation during training logs as `eval/*`, listed in docs/eval.md.
IoUs are computed at each file's own resolution, as the RefCOCO protocol does: the low-res mask logits are
brought back from the working square (`data.aspect`: squashed, or padded and cropped) to the image's height and
width, and compared with the annotation's mask there. `--resolution working` compares on the working square
instead (as the evaluation during training does); built-in shapes have no other resolution.
Prints a short table and writes the numbers as JSON (`--out`, default CHECKPOINT/eval_<data>_<split>.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from dualrl.data.scenes import SPLITS
from dualrl.eval.inputs import eval_recipe, regions
from dualrl.eval.protocol import EmptySplit, evaluate_model
from dualrl.model.build import build_model
from dualrl.recipe import RecipeError, check_model, check_writable_folder
from dualrl.recipe.cli import ArgumentParser, fail
from dualrl.recipe.data import REFCOCO_SPLITS
from dualrl.recipe.section import MAX_BATCH
from dualrl.runtime import resolve_device

SHOWN = ("regions", "queries", "ref_miou", "ref_ciou", "meteor", "cycle_miou", "caption_tokens")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m dualrl.eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    parser.add_argument("--data", choices=("refcoco", "shapes"), default="refcoco")
    parser.add_argument("--split", default="val", help="refcoco: val, testA, testB, test; shapes: val, test, select")
    parser.add_argument("--weights", choices=("ema", "policy"), default="ema")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-regions", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--resolution",
        choices=("file", "working"),
        default="file",
        help="compare masks at each file's resolution (the RefCOCO protocol) or on the working square",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="whose model section builds a model directory "
        "(default recipes/sft_dual.yaml; a Sa2VA-4B checkpoint needs a 4B-shaped one)",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        return fail("--batch-size must be at least 1")
    if args.batch_size > MAX_BATCH:
        return fail(f"--batch-size must be at most {MAX_BATCH}")
    if args.max_regions is not None and args.max_regions < 1:
        return fail("--max-regions must be at least 1 (leave it out for the whole split)")
    splits = SPLITS if args.data == "shapes" else REFCOCO_SPLITS
    if args.split not in splits:
        return fail(f"--split {args.split}: the {args.data} splits are {', '.join(splits)}")
    try:
        device = resolve_device(args.device)
    except RuntimeError:
        return fail("--device cuda: no CUDA device is visible")
    folder = args.checkpoint if args.checkpoint.is_dir() else Path(".")
    out = args.out or folder / f"eval_{args.data}_{args.split}.json"
    try:
        recipe = eval_recipe(args.checkpoint, args.overrides, args.weights, args.recipe)
        if args.data != "shapes" and getattr(recipe.data, args.data) is None:
            raise RecipeError(f"--data {args.data}: set data.{args.data}.* (its paths) in the recipe or as overrides")
        if out.is_dir():
            raise RecipeError(f"--out {str(out)!r} is a folder; give the JSON file's path")
        check_writable_folder(out.parent, "--out")
        check_model(recipe.model)
    except (RecipeError, FileNotFoundError) as err:
        return fail(err)
    t0 = time.time()
    model = build_model(recipe.model, device).eval()
    try:
        samples = regions(recipe, args.data, args.split, args.max_regions, full_masks=args.resolution == "file")
        result = evaluate_model(model, samples, args.batch_size, recipe.data.aspect)
    except (RecipeError, FileNotFoundError, EmptySplit) as err:
        return fail(err)
    result.update(
        checkpoint=str(args.checkpoint),
        data=args.data,
        split=args.split,
        weights=args.weights,
        resolution=args.resolution if args.data == "refcoco" else "working",
        device=device,
        seconds=round(time.time() - t0, 2),
    )
    out.write_text(json.dumps(result, indent=1))
    for name in SHOWN:
        value = result.get(name, "—")
        print(f"{name:16s} {value:.4f}" if isinstance(value, float) else f"{name:16s} {value}")
    if "meteor_error" in result:
        print(f"meteor left out: {result['meteor_error']}")
    print(f"written to {out}")
    return 0
