"""Scaling over the GPUs of one host: the Sa2VA-4B-shaped recipes under the Ray runtime on 1, 2, 4 and 8 GPUs.

    python benchmarks/gpu/scaling.py [--gpus 1 2 4 8] [--algos sft_dual grpo] [--steps 8] [--async]
        [--object-store] [--equivalence] [--tiny] [--out results.json]

Each point runs `python -m dualrl.launch` on the built-in shapes data at the recipe's working size (random init,
recipes/sa2va/random_init/), with 8 regions per learner (the one-GPU recipe's batch) and this layout:

| GPUs | learners | rollout | reward | each learner | each worker | weights |
|---|---|---|---|---|---|---|
| 1 | 1 | 1 | 1 | 0.4 | 0.3 | CUDA IPC (one card) |
| 2 | 1 | 1 | 1 | 1 | 0.5 | NCCL (learner alone; the workers share the other card) |
| 4 | 2 | 1 | 1 | 1 | 1 | NCCL; the learners' DDP over NCCL |
| 8 | 4 | 2 | 2 | 1 | 1 | NCCL; the learners' DDP over NCCL (recipes/sa2va/sa2va_4b_sft_dual_8gpu.yaml's layout) |

(NCCL takes one rank per card in a group, and a weight channel holds learner 0 and every worker of one kind: so
two workers of a kind never share a card here, or the weights would go through the object store.)

and the in-process runtime on one GPU as the baseline (`local`). For each: the median step after the first, the
step's phases (`step/wait/ms`, `step/rollout/ms`, `step/reward/ms`, `step/learn/ms`, `sync/ms`), regions/s and
captions/s, the scaling efficiency (regions/s over GPUs x the in-process baseline's), and the peak memory of each
card (nvidia-smi, read every second while the run lasts). `--async` repeats each layout with
`runtime.async_rollout`; `--object-store` repeats the layouts of 2 GPUs or more with
`runtime.weight_sync=object_store` (the sync time against NCCL); `--equivalence` runs the tiny recipe with 1 learner
(2 micro-batches) against 2 learners on cards of their own (NCCL), float32 and bf16 (`ray_one_gpu.equivalence`).
Points needing more GPUs than the machine has are left out and listed. `--tiny` runs the same layouts with the tiny
recipe on the CPU (no GPU asked for), to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_PATHS  # the real-scale recipe's data and weight paths off
from ray_one_gpu import TINY, equivalence, launch

RECIPES = {
    "sft_dual": "recipes/sa2va/random_init/sa2va_4b_sft_dual.yaml",
    "grpo": "recipes/sa2va/random_init/sa2va_4b_grpo.yaml",
}
LAYOUTS = {  # GPUs: learners, rollout workers, reward workers, GPUs of each learner, GPUs of each worker
    1: (1, 1, 1, 0.4, 0.3),
    2: (1, 1, 1, 1.0, 0.5),
    4: (2, 1, 1, 1.0, 1.0),
    8: (4, 2, 2, 1.0, 1.0),
}
REGIONS_PER_LEARNER = 8


class CardMemory:
    """The most memory each card used while it ran (nvidia-smi every second; empty without nvidia-smi). A read
    that fails stops the polling and is kept in `error`, so a partial peak is never reported as the peak."""

    def __init__(self):
        self.peak_mib: dict[str, int] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.wait(1.0):
            try:
                done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
                for line in done.stdout.splitlines():
                    index, used = (x.strip() for x in line.split(","))
                    self.peak_mib[index] = max(self.peak_mib.get(index, 0), int(used))
            except (subprocess.SubprocessError, ValueError) as err:
                self.error = f"nvidia-smi read failed: {err!r}"
                return

    def __enter__(self) -> CardMemory:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines())


def point(name: str, recipe: str, overrides: list[str], out_dir: Path, timeout_s: float, regions: int, g: int) -> dict:
    """One run with its cards' peak memory, regions/s and captions/s."""
    with CardMemory() as memory:
        result = launch(name, recipe, overrides, out_dir, timeout_s)
    if memory.error is None:
        result["peak_gib_per_card"] = {k: round(v / 1024, 1) for k, v in sorted(memory.peak_mib.items())}
    else:
        result["peak_memory_error"] = memory.error
    if result.get("median_step_ms"):
        result["regions_per_s"] = round(regions / (result["median_step_ms"] / 1000), 2)
        result["captions_per_s"] = round(regions * g / (result["median_step_ms"] / 1000), 2)
    print(name, json.dumps({k: v for k, v in result.items() if k not in ("command", "summary")}), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    parser.add_argument("--algos", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--async", dest="async_rollout", action="store_true", help="also with runtime.async_rollout")
    parser.add_argument("--object-store", action="store_true", help="also with the weights through the object store")
    parser.add_argument("--equivalence", action="store_true", help="1 against 2 learners on cards of their own")
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe on the CPU, to check the script")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT") or "/tmp/scaling")
    out_dir.mkdir(parents=True, exist_ok=True)
    have = 8 if args.tiny else gpu_count()
    results: dict = {"gpus_on_machine": have, "left_out": [], "runs": {}}
    steps = [f"train.steps={args.steps}", *([] if args.tiny else ["runtime.worker_cpus=1"])]
    for algo in args.algos:
        if args.tiny:
            recipe, base = TINY, ["data.shapes.val_size=8", "model.max_caption_tokens=6"]
            base += ["algo.name=grpo", "algo.grpo.num_generations=2"] if algo == "grpo" else []
        else:
            recipe = RECIPES[algo]
            base = [
                *NO_PATHS,
                "data.shapes={image_size: 1024, val_size: 16}",
                "data.num_workers=6",
                "eval.batch_size=8",
            ]
        g = 2 if args.tiny and algo == "grpo" else 1
        if algo == "grpo" and not args.tiny:
            from dualrl.recipe import load_recipe

            g = load_recipe(recipe, [*base, "output_dir=unused"]).algo.grpo.num_generations
        baseline = point(
            f"{algo}_local",
            recipe,
            [*base, *steps, "runtime.kind=local", f"data.batch_size={REGIONS_PER_LEARNER}"],
            out_dir,
            args.timeout_s,
            REGIONS_PER_LEARNER,
            g,
        )
        results["runs"][f"{algo}_local"] = baseline
        for n in args.gpus:
            learners, rollout, reward, learner_gpus, worker_gpus = LAYOUTS[n]
            if n > have:
                results["left_out"].append(f"{algo} on {n} GPUs: the machine has {have}")
                continue
            regions = REGIONS_PER_LEARNER * learners
            layout = [
                f"runtime.learners={learners}",
                f"runtime.rollout_workers={rollout}",
                f"runtime.reward_workers={reward}",
                f"data.batch_size={regions}",
            ]
            if not args.tiny:
                layout += [f"runtime.learner_gpus={learner_gpus}", f"runtime.worker_gpus={worker_gpus}"]
            variants = {"": []}
            if args.async_rollout:
                variants["_async"] = ["runtime.async_rollout=true"]
            if args.object_store and n > 1:
                variants["_object_store"] = ["runtime.weight_sync=object_store"]
            for suffix, extra in variants.items():
                name = f"{algo}_{n}gpu{suffix}"
                run = point(name, recipe, [*base, *steps, *layout, *extra], out_dir, args.timeout_s, regions, g)
                if run.get("regions_per_s") and baseline.get("regions_per_s"):
                    run["scaling_efficiency"] = round(run["regions_per_s"] / (n * baseline["regions_per_s"]), 3)
                results["runs"][name] = run
    if args.equivalence:
        if have >= 3 or args.tiny:
            share = [] if args.tiny else ["runtime.learner_gpus=1", "runtime.worker_gpus=0.5", "runtime.worker_cpus=1"]
            results["equivalence"] = equivalence(out_dir, [f"train.steps={args.steps}"], share, args.timeout_s)
        else:
            results["left_out"].append(
                f"equivalence: 2 learners on cards of their own and the workers need 3 GPUs, the machine has {have}"
            )
    path = args.out or out_dir / "scaling.json"
    path.write_text(json.dumps(results, indent=1))
    print("left out:", results["left_out"], "\nwritten", path)
    runs = [*results["runs"].values(), *([results["equivalence"]] if "equivalence" in results else [])]
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
