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
prefix: the ceiling of teaching the captioner only where to stop (an oracle: it knows the mask when it chooses). And a
rule that needs no mask: each caption cut before its first token the captioner chose with a probability under p, for
p in `--cut-below` (at least one token kept).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dualrl.algo.objectives import caption_prefixes
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
    parser.add_argument("--cut-below", type=float, nargs="*", default=[0.5, 0.7, 0.9])
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
    ref, greedy, sampled, prefix_ious, greedy_logprobs = [], [], [], [], []
    for i, batch in enumerate(batches):
        ref.append(runtime.learner.refer(batch)[0])
        captions = runtime.rollout.describe(batch, RolloutPlan(), args.seed * 1_000_003 + i)
        greedy.append(runtime.reward.score(batch, captions).segmentation["mask_iou"])
        if args.prefixes:
            prefix_ious += _prefix_ious(runtime.reward, batch, captions.ids)
            greedy_logprobs += [lp.cpu() for lp in captions.logprobs]
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
        cuts = torch.stack([iou.argmax() for iou in prefix_ious])  # longest first: ties keep the longest
        result["best_prefix_cycle_miou"] = torch.stack([iou.max() for iou in prefix_ious]).mean().item()
        result["best_prefix_is_whole"] = (cuts == 0).float().mean().item()
        result["best_prefix_tokens_cut_mean"] = cuts.float().mean().item()
        for p in args.cut_below:
            kept = [_kept_above(lp, p) for lp in greedy_logprobs]
            ious = [iou[len(iou) - k] for iou, k in zip(prefix_ious, kept)]
            result[f"cut_below_{p}_cycle_miou"] = torch.stack(ious).mean().item()
            result[f"cut_below_{p}_tokens_cut_mean"] = sum(len(i) - k for i, k in zip(prefix_ious, kept)) / len(kept)
    for key, value in result.items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _prefix_ious(reward, batch: dict, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per region, the cycle IoUs of its caption's non-empty prefixes, longest (the whole caption) first."""
    if any(len(c) == 0 for c in ids):
        raise ValueError("an empty greedy caption has no prefix to segment")
    prefixes, region = caption_prefixes(ids)
    return list(reward.segment(batch, prefixes, region)["mask_iou"].split([len(c) for c in ids]))


def _kept_above(logprobs: torch.Tensor, p: float) -> int:
    """How many tokens precede the first one chosen with a probability under `p` (at least 1)."""
    low = (logprobs.exp() < p).nonzero()
    return len(logprobs) if len(low) == 0 else max(1, int(low[0]))


if __name__ == "__main__":
    sys.exit(main())
