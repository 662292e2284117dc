"""What finding each region's image-token cells costs the training process on the host: pooling a float copy of
the masks (as dualrl did before 0.5) against the block sums `GroundedVLM.region_cells` uses for masks whose sides
the token grid divides.

    python benchmarks/region_cells.py [--masks 8] [--size 1024] [--side 16] [--threads 1 4] [--repeats 5]

The default is one batch of the 4B recipes (8 regions) at Sa2VA's 1024 px and 16 x 16 image tokens; a `sft_dual`
step finds a batch's cells twice (the teacher's captions, the update), and those of its references once more.
Both run in this process, alternately, at each torch thread count (the driver runs a GPU learner with one:
`train.threads`); the figure is the median wall time of one call, and the ratio pooling / block sums. The cells of
the two are checked equal first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dualrl.model.grounded_vlm import GroundedVLM


def pooled_cells(count: int, masks: torch.Tensor) -> list[list[int]]:
    """The cells as pooling a float copy gives them (dualrl 0.5's way)."""
    side = int(count**0.5)
    cover = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), side).flatten(1)
    keep = cover >= 0.5
    empty = ~keep.any(dim=1)
    keep[empty, cover[empty].argmax(dim=1)] = True
    return [(i * count + keep[i].nonzero().flatten()).tolist() for i in range(len(masks))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    # regions of many sizes: a random share of each image
    masks = torch.rand(args.masks, args.size, args.size, generator=gen) > torch.rand(args.masks, 1, 1, generator=gen)
    count = args.side**2
    if GroundedVLM.region_cells(count, masks) != pooled_cells(count, masks):
        raise SystemExit("the block sums' cells differ from pooling's")
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"pooling": [], "block_sums": []}
        for _ in range(args.repeats):
            for name, fn in (("pooling", pooled_cells), ("block_sums", GroundedVLM.region_cells)):
                t = time.perf_counter()
                fn(count, masks)
                times[name].append(time.perf_counter() - t)
        med = {f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}
        results[f"threads_{threads}"] = {**med, "ratio": med["pooling_ms"] / med["block_sums_ms"]}
        print(f"{threads} thread(s): " + json.dumps({k: round(v, 2) for k, v in results[f"threads_{threads}"].items()}))
    print(json.dumps({"masks": args.masks, "size": args.size, "side": args.side, **results}))


if __name__ == "__main__":
    main()
