"""What the default recipe's step (`recipes/sft_dual.yaml`, in one process) saves on image encodings, each saving
against the way before it, in this process:

- the update reuses the teacher's encoding of the step's images (`GroundedVLM.share_frozen_encoders`; with
  `optim.accumulation=2` or more, each micro-batch its rows of it): timed as whole driver steps (captions, rewards,
  update, sync) with the learner's encoding shared and with one of its own;
- SAM2's FPN position encodings as a view over the batch (`sam.BroadcastPositionEmbedding`) against SAM2's copy per
  image: the image encoder on one batch.

    python benchmarks/cpu_step.py [--steps 6] [--repeats 8] [--out results.json] [KEY=VALUE ...]

Each pair runs alternately in this process; figures are median wall times and the ratio old / new. The encoder's
two outputs (levels and position encodings) are checked equal first; that the update learns the same from a shared
encoding is a test (`tests/runtime/test_shared_encoders.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from sam2.modeling.position_encoding import PositionEmbeddingSine

from dualrl.algo.registry import objective_class
from dualrl.algo.rollout_data import Rollout
from dualrl.data.loader import train_batches
from dualrl.model import sam as samlib
from dualrl.model.grounded_vlm import LastEncoding
from dualrl.recipe import load_recipe
from dualrl.runtime import set_intra_op_threads, start_runtime
from dualrl.train import ROLLOUT_SEED, step_generator, step_seed


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def pair(name: str, old: list[float], new: list[float]) -> dict:
    out = {"old_ms": median_ms(old), "new_ms": median_ms(new)}
    out["ratio"] = out["old_ms"] / out["new_ms"]
    print(f"{name:28s} old {out['old_ms']:8.1f} ms   new {out['new_ms']:8.1f} ms   {out['ratio']:.2f}x", flush=True)
    return out


def driver_steps(runtime, recipe, batches: list[dict], steps: int) -> dict:
    """Whole steps, alternating: the learner's encodings shared with the teacher's (new) and its own (old)."""
    plan = objective_class(recipe.algo).plan(recipe)
    shared = runtime.learner.model.encodings
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(2 * steps + 2):
        label = "new" if i % 2 == 0 else "old"
        runtime.learner.model.encodings = shared if label == "new" else LastEncoding()  # nothing kept from before
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        captions = runtime.rollout.describe(batch, plan, ROLLOUT_SEED + step_seed(recipe.train.seed, i + 1))
        scored = runtime.reward.score(batch, captions, plan.group_size)
        rollout = Rollout(captions, plan.group_size, scored.total)
        runtime.learner.step(batch, rollout, step_generator(recipe.train.seed, i + 1))
        runtime.sync()
        if i >= 2:  # the first of each is a warm-up
            times[label].append(time.perf_counter() - t)
    runtime.learner.model.encodings = shared
    return pair("driver step", times["old"], times["new"])


def position_encodings(model, batch: dict, repeats: int) -> dict:
    encoder = model.sam.image_encoder
    pe = encoder.neck.position_encoding
    pixels = samlib.imagenet_pixels(batch["images"], model.spec.sam.image_size)
    times: dict[str, list[float]] = {"old": [], "new": []}
    with torch.no_grad():
        outputs = {}
        for label, cls in (("old", PositionEmbeddingSine), ("new", samlib.BroadcastPositionEmbedding)):
            pe.__class__ = cls
            outputs[label] = encoder(pixels)
        for key in ("backbone_fpn", "vision_pos_enc"):
            for a, b in zip(outputs["old"][key], outputs["new"][key], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        for _ in range(repeats):
            for label, cls in (("old", PositionEmbeddingSine), ("new", samlib.BroadcastPositionEmbedding)):
                pe.__class__ = cls
                t = time.perf_counter()
                encoder(pixels)
                times[label].append(time.perf_counter() - t)
    pe.__class__ = samlib.BroadcastPositionEmbedding
    return pair("SAM2 image encoder", times["old"], times["new"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/sft_dual.yaml")
    parser.add_argument("--steps", type=int, default=6, help="timed driver steps of each kind")
    parser.add_argument("--repeats", type=int, default=8, help="timed encoder calls of each kind")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, [*args.overrides, "data.num_workers=0"])
    set_intra_op_threads(recipe.train.threads, "cpu")
    runtime = start_runtime(recipe)
    runtime.sync()
    draw = train_batches(recipe.data, recipe.model.sam.image_size)
    batches = [next(draw) for _ in range(4)]
    draw.close()
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": recipe.data.batch_size,
        "accumulation": recipe.optim.accumulation,
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "driver_step": driver_steps(runtime, recipe, batches, args.steps),
        "sam_image_encoder": position_encodings(runtime.learner.model, batches[0], args.repeats),
    }
    runtime.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
