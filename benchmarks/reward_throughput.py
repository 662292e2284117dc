"""Scoring throughput of the `mask_iou` reward: G captions per region sharing one image encoding.

Times the RewardWorker's EMA segmentation (what `mask_iou` costs) on the embedded default's model, in one
process, on the same regions and captions:
  - G = 1: one caption per region (the baseline);
  - G = 8, shared: eight captions per region, each image encoded once (what dualrl does);
  - G = 8, naive: eight captions per region, each caption's image encoded on its own (the image tensor
    repeated per caption), the way a per-sample reward function would do it.
Each timed call starts from an empty feature cache, as a new training batch would.

    python benchmarks/reward_throughput.py [--regions 8] [--group 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dualrl.data.scenes import ShapesDataset, collate_regions
from dualrl.recipe import load_recipe
from dualrl.workers import RewardWorker


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe("recipes/sft_dual.yaml", ["output_dir=unused", "wandb.mode=disabled"])
    worker = RewardWorker(recipe.model, recipe.rewards, "cpu")
    model = worker.model
    ds = ShapesDataset("val", 64, image_size=recipe.data.shapes.image_size)
    batch = collate_regions([ds[i] for i in range(args.regions)])
    g, b = args.group, args.regions
    region = torch.arange(b).repeat_interleave(g)
    torch.manual_seed(0)
    with torch.no_grad():
        captions = model.describe(batch["images"], batch["masks"][region], image_index=region, sample=True)
    one = [captions.ids[i * g] for i in range(b)]
    repeated = {"images": batch["images"][region].clone(), "masks": batch["masks"][region]}

    def fresh(fn):
        def call():
            model.encodings.clear()  # a new batch: nothing cached
            fn()

        return call

    t1 = _time(fresh(lambda: worker.segment(batch, one)), args.repeats)
    tg = _time(fresh(lambda: worker.segment(batch, captions.ids, region)), args.repeats)
    tn = _time(fresh(lambda: worker.segment(repeated, captions.ids)), args.repeats)
    shared = worker.segment(batch, captions.ids, region)["mask_iou"]
    naive = worker.segment(repeated, captions.ids)["mask_iou"]
    print(
        f"mask_iou scoring, {b} regions, embedded default model (SAM {recipe.model.sam.image_size} px), "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"  G=1            {b / t1:8.1f} captions/s  {1000 * t1:7.1f} ms/batch")
    print(
        f"  G={g} shared    {b * g / tg:8.1f} captions/s  {1000 * tg:7.1f} ms/batch  "
        f"= {tg / t1:.2f}x the G=1 time for {g}x the captions"
    )
    print(
        f"  G={g} naive     {b * g / tn:8.1f} captions/s  {1000 * tn:7.1f} ms/batch  (shared is {tn / tg:.2f}x faster)"
    )
    print(f"  shared == naive scores: max |diff| = {(shared - naive).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
