"""The ceiling of caption search from a starting model: how far a policy that picks among its own samples (GRPO)
could raise the cycle IoU before the segmenter, not the captioner, is what limits it.

    python experiments/best_of_g.py RECIPE [dotted.key=value ...] [--g 8] [--temperature 1.0] [--split select]
        [--regions 128] [--seed 0] [--out FILE.json]

The recipe's starting model (its `model.pretrained` / `model.init_from`), on the held-out regions of `--split`
(`select` by default: measure settings there, not on `val`). For each region: the referring IoU with its true
expression, the cycle IoU of the greedy caption, and the cycle IoUs of G captions sampled at `--temperature`
(the segmenter is the same model, as at step 0 of a run). Prints the means and the oracle best of G: the cycle
mIoU a policy would reach if it always produced its best sample.

`--prefixes` also segments every prefix of each greedy caption (its first 1, 2, ... tokens) and reports the best
prefix: the ceiling of teaching the captioner only where to stop.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dualrl.algo.rollout_data import RolloutPlan
from dualrl.data.loader import DataError, EvalBatches
from dualrl.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--g", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--split", default="select", choices=["val", "select"])
    parser.add_argument("--regions", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefixes", action="store_true", help="also the best prefix of each greedy caption")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.g < 2 or args.regions < 1 or args.temperature <= 0:
        print("error: --g must be >= 2, --regions >= 1 and --temperature > 0", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(
            args.recipe, [*args.overrides, "wandb.mode=disabled", "runtime.kind=local", "output_dir=/dev/null"]
        )
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dualrl.runtime import start_runtime

    data = recipe.data
    if data.shapes is not None:
        size_key = "val_size" if args.split == "val" else "select_size"
        data = data.model_copy(update={"shapes": data.shapes.model_copy(update={size_key: args.regions})})
    try:
        batches = EvalBatches(data, recipe.model.sam.image_size, recipe.eval.batch_size, args.split)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runtime = start_runtime(recipe)
    runtime.sync()
    sampled_plan = RolloutPlan(group_size=args.g, sample=True, temperature=args.temperature)
    ref, greedy, sampled, best_prefix, best_cut = [], [], [], [], []
    for i, batch in enumerate(batches):
        ref.append(runtime.learner.refer(batch)[0])
        captions = runtime.rollout.describe(batch, RolloutPlan(), args.seed * 1_000_003 + i)
        greedy.append(runtime.reward.score(batch, captions).segmentation["mask_iou"])
        if args.prefixes:
            iou, cut = _best_prefixes(runtime.reward, batch, captions.ids)
            best_prefix.append(iou)
            best_cut.append(cut)
        captions = runtime.rollout.describe(batch, sampled_plan, args.seed * 1_000_003 + i)
        ious = runtime.reward.score(batch, captions, args.g).segmentation["mask_iou"]
        sampled.append(ious.view(-1, args.g))
    runtime.shutdown()
    sampled_all = torch.cat(sampled)
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "split": args.split,
        "regions": len(sampled_all),
        "g": args.g,
        "temperature": args.temperature,
        "ref_miou": torch.cat(ref).mean().item(),
        "greedy_cycle_miou": torch.cat(greedy).mean().item(),
        "sampled_cycle_miou": sampled_all.mean().item(),
        "best_of_g_cycle_miou": sampled_all.max(1).values.mean().item(),
    }
    if args.prefixes:
        cuts = torch.cat(best_cut)
        result["best_prefix_cycle_miou"] = torch.cat(best_prefix).mean().item()
        result["best_prefix_is_whole"] = (cuts == 0).float().mean().item()
        result["best_prefix_tokens_cut_mean"] = cuts.float().mean().item()
    for key, value in result.items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _best_prefixes(reward, batch: dict, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per region, the best cycle IoU over the non-empty prefixes of its caption, and how many tokens that prefix
    leaves out (0: the whole caption; ties go to the longest)."""
    if any(len(c) == 0 for c in ids):
        raise ValueError("an empty greedy caption has no prefix to segment")
    prefixes = [c[:k] for c in ids for k in range(len(c), 0, -1)]
    region = torch.cat([torch.full((len(c),), r, dtype=torch.long) for r, c in enumerate(ids)])
    ious = reward.segment(batch, prefixes, region)["mask_iou"].split([len(c) for c in ids])
    return torch.stack([x.max() for x in ious]), torch.stack([x.argmax() for x in ious])


if __name__ == "__main__":
    sys.exit(main())
