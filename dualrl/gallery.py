"""`python -m dualrl.gallery RUN` — a few held-out regions through the dual loop, at a run's start and at its end.

For each region: the image with the region's mask (the image dimmed outside it); then, for the model the run
started from and for its latest EMA weights, the caption the model writes for the region and the mask it segments
from that caption (its IoU with the region's mask in the title). Regions are the first `--regions` of the built-in
shapes `val` split (or `--split test`), the split the evaluation during training uses.

    python -m dualrl.gallery outputs/sft_dual --regions 6 --out docs/img/gallery.png
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from itertools import islice
from pathlib import Path

import torch

from dualrl.data.batch import collate_regions
from dualrl.eval.inputs import eval_recipe, regions
from dualrl.eval.metrics import binarize, intersection_union
from dualrl.model.build import build_model
from dualrl.recipe import RecipeError, load_recipe


@torch.no_grad()
def cycle(model, batch: dict) -> tuple[list[str], torch.Tensor]:
    """Each region's caption and the boolean mask (image size) segmented from it."""
    with model.autocast():
        feats = model.encode_images(batch["images"])
        captions = model.describe(None, batch["masks"], feats=feats).texts
        logits, *_ = model.segment(None, captions, feats=feats)
    return captions, binarize(logits, batch["masks"].shape[-2:]).cpu()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter, union = intersection_union(a[None], b[None])
    return inter.item() / union.item() if union.item() else 1.0


def draw(batch: dict, results: dict[str, tuple[list[str], torch.Tensor]], out: Path, dpi: int = 80) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(batch["images"])
    cols = 1 + len(results)
    fig, axes = plt.subplots(n, cols, figsize=(3.2 * cols, 3.4 * n), squeeze=False)
    images = batch["images"].permute(0, 2, 3, 1).float().div(255.0).numpy()  # uint8 RGB
    truth = batch["masks"].bool()

    def show(ax, k: int, mask: torch.Tensor, color: str, title: str) -> None:
        """The image dimmed outside `mask`, the mask's outline in `color`."""
        inside = mask.numpy()
        shown = images[k] * 0.35
        shown[inside] = images[k][inside]
        ax.imshow(shown)
        if inside.any():
            ax.contour(inside.astype(float), levels=[0.5], colors=[color], linewidths=1.5)
        ax.set_title("\n".join(textwrap.wrap(title, 34)[:4]), fontsize=8)
        ax.axis("off")

    for k in range(n):
        expression = batch["expression"][k] or "(no expression)"
        show(axes[k, 0], k, truth[k], "lime", f"region: {expression}")
        for c, (name, (captions, masks)) in enumerate(results.items(), start=1):
            show(axes[k, c], k, masks[k], "magenta", f'{name}: "{captions[k]}" (IoU {_iou(masks[k], truth[k]):.2f})')
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualrl.gallery", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run's output_dir")
    parser.add_argument("--regions", type=int, default=6)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/gallery.png (.jpg: a smaller file)")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)
    try:
        if args.regions < 1:
            raise RecipeError("--regions must be at least 1")
        if not (args.run / "recipe.yaml").is_file():
            raise RecipeError(f"{args.run}: not a training run (no recipe.yaml)")
        start = load_recipe(args.run / "recipe.yaml")  # the model as the run built it at step 0
        end = eval_recipe(args.run, [], "ema")  # its latest checkpoint's EMA weights
        samples = list(islice(regions(start, "shapes", args.split, None, full_masks=False), args.regions))
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    batch = collate_regions(samples)
    results = {}
    for name, recipe in (("start", start), ("end", end)):
        model = build_model(recipe.model, "cpu").eval()
        results[name] = cycle(model, batch)
        del model
    out = args.out or args.run / "gallery.png"
    draw(batch, results, out, args.dpi)
    for k in range(len(samples)):
        print(f"{k}: " + " | ".join(f"{name}: {caps[k]!r}" for name, (caps, _) in results.items()))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
