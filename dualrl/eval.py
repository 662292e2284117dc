"""`python -m dualrl.eval CHECKPOINT [dotted.key=value ...]` — evaluate a model on held-out regions.

CHECKPOINT is a training run (its output_dir, checkpoints/ folder or one step_N folder: the run's
recipe.yaml says how to build the model, the checkpoint's EMA or student weights go into it), a dualrl
model directory (model.safetensors + arch.json) or a Sa2VA Hugging Face directory (config.json +
safetensors + tokenizer); a directory is built with the model section of `--recipe` (default
`recipes/sft_dual.yaml`).
Overrides apply to that recipe, e.g. `data.refcoco.root=/data/refer data.refcoco.images=/data/coco/train2014`.

Three measures, on `--data refcoco` (a RefCOCO/+/g split in the `refer` layout) or `--data shapes`:
- referring segmentation, RefCOCO protocol: every sentence of every object is one query; cIoU = total
  intersection / total union over the split, gIoU = mean of the per-query IoUs;
- region captioning: the model's greedy caption of each object, METEOR (nltk, WordNet) against all its
  sentences;
- cycle IoU: the model segments its own caption of each object; mean IoU with the object's mask.
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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dualrl.data.batch import collate_regions
from dualrl.data.loader import SkipLog, build_source, in_file_order
from dualrl.model.build import build_model
from dualrl.recipe import Recipe, RecipeError, ShapesSpec, load_recipe

log = logging.getLogger("dualrl.eval")


DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft_dual.yaml"


def eval_recipe(checkpoint: Path, overrides: list[str], weights: str, recipe: Path | None = None):
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


def regions(recipe: Recipe, data: str, split: str, limit: int | None, full_masks: bool = True):
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


def _inter_union(logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = (
        F.interpolate(logits[:, None].float(), size=tuple(gt.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        > 0
    )
    gt = gt.to(pred.device).bool()
    return (pred & gt).flatten(1).sum(1).double(), (pred | gt).flatten(1).sum(1).double()


def to_file_resolution(logits: torch.Tensor, hw: tuple[int, int], aspect: str, size: int) -> torch.Tensor:
    """Mask logits of a working square -> the prediction (logit > 0) at the file's (height, width): a squashed
    square is resized whole; a padded one is first cropped to where the image sits (top left)."""
    h, w = hw
    logits = logits[None, None].float()
    if aspect == "pad":
        scale = size / max(h, w)
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        logits = logits[..., : max(1, round(h * scale)), : max(1, round(w * scale))]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0


def _inter_union_full(logits: torch.Tensor, masks: list, aspect: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union per query at each file's resolution (`masks`: numpy bool, one per query)."""
    inter, union = [], []
    for lg, mask in zip(logits, masks):
        pred = to_file_resolution(lg, mask.shape, aspect, size)
        gt = torch.from_numpy(mask).to(pred.device)
        inter.append((pred & gt).sum())
        union.append((pred | gt).sum())
    return torch.stack(inter).double(), torch.stack(union).double()


@torch.no_grad()
def evaluate_model(model, samples, batch_size: int, aspect: str = "squash") -> dict:
    """Referring cIoU / gIoU, caption METEOR and cycle IoU over `samples`. Samples with a `full_mask` are
    scored at their file's resolution (`aspect` says how the working square was made)."""
    inter, union, cycle, captions, references, lengths = [], [], [], [], [], []
    items: list[dict] = []

    def flush():
        if not items:
            return
        batch = collate_regions(items)
        full = batch.get("full_mask")
        full = full if full and all(m is not None for m in full) else None

        def inter_union(logits: torch.Tensor, rows: list[int]):
            if full is None:
                return _inter_union(logits, batch["masks"][rows])
            return _inter_union_full(logits, [full[r] for r in rows], aspect, batch["masks"].shape[-1])

        feats = model.encode_images(batch["images"])
        sentences = [refs or [batch["expression"][r]] for r, refs in enumerate(batch["references"])]
        queries = [(r, s) for r, group in enumerate(sentences) for s in group if s]
        if queries:
            index = torch.tensor([r for r, _ in queries])
            logits, *_ = model.segment(None, [s for _, s in queries], feats=feats, image_index=index)
            i, u = inter_union(logits, index.tolist())
            inter.append(i.cpu())
            union.append(u.cpu())
        described = model.describe(None, batch["masks"], feats=feats)
        logits, *_ = model.segment(None, described.texts, feats=feats)
        i, u = inter_union(logits, list(range(len(items))))
        cycle.append((i / u.clamp(min=1)).cpu())
        captions.extend(described.texts)
        lengths.extend(len(ids) for ids in described.ids)
        references.extend(list(r) for r in batch["references"])
        items.clear()

    with model.autocast():
        for sample in samples:
            items.append(sample)
            if len(items) == batch_size:
                flush()
        flush()
    if not captions:
        raise RuntimeError("no usable region in the split")
    out = {
        "regions": len(captions),
        "cycle_miou": torch.cat(cycle).mean().item(),
        "caption_tokens": sum(lengths) / len(lengths),
        "examples": [{"caption": c, "references": r} for c, r in list(zip(captions, references))[:5]],
    }
    if inter:
        i, u = torch.cat(inter), torch.cat(union)
        out.update(
            queries=len(i),
            ref_ciou=(i.sum() / u.sum().clamp(min=1)).item(),
            ref_giou=(i / u.clamp(min=1)).mean().item(),
        )
    out.update(_meteor(captions, references))
    return out


def _meteor(captions: list[str], references: list[list[str]]) -> dict:
    try:
        from rewards.meteor import meteor_scores
    except ImportError as err:
        return {"caption_meteor_error": str(err)}
    try:
        scores = [s for s in meteor_scores(captions, references) if s is not None]
    except RuntimeError as err:  # WordNet missing: the message says how to install it
        return {"caption_meteor_error": str(err)}
    return {"caption_meteor": sum(scores) / len(scores)} if scores else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualrl.eval", description=__doc__.splitlines()[0])
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
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = eval_recipe(args.checkpoint, args.overrides, args.weights, args.recipe)
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = time.time()
    model = build_model(recipe.model, device).eval()
    try:
        samples = regions(recipe, args.data, args.split, args.max_regions, full_masks=args.resolution == "file")
        result = evaluate_model(model, samples, args.batch_size, recipe.data.aspect)
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update(
        checkpoint=str(args.checkpoint),
        data=args.data,
        split=args.split,
        weights=args.weights,
        resolution=args.resolution if args.data == "refcoco" else "working",
        device=device,
        seconds=round(time.time() - t0, 2),
    )
    folder = args.checkpoint if args.checkpoint.is_dir() else Path(".")
    out = args.out or folder / f"eval_{args.data}_{args.split}.json"
    out.write_text(json.dumps(result, indent=1))
    rows = [
        ("regions", result["regions"]),
        ("queries", result.get("queries", 0)),
        ("ref cIoU", result.get("ref_ciou")),
        ("ref gIoU", result.get("ref_giou")),
        ("caption METEOR", result.get("caption_meteor")),
        ("cycle mIoU", result["cycle_miou"]),
    ]
    for name, value in rows:
        print(f"{name:16s} {value:.4f}" if isinstance(value, float) else f"{name:16s} {value}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
