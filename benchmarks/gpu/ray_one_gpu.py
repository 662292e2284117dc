"""The Ray runtime on one GPU: the actors share the card through fractional GPU requests.

    python benchmarks/gpu/ray_one_gpu.py [--steps 8] [--tiny] [--out results.json]

Runs `python -m dualrl.launch` under `runtime.kind=ray` as a user would, on the built-in shapes data at the
recipe's working size, and reads the runs' metrics.jsonl:
- `sync` / `async`: the Sa2VA-4B-shaped `sft_dual` recipe with random init (recipes/sa2va/random_init/), one
  learner, one rollout and one reward worker at `runtime.worker_gpus` 0.3 each, with `runtime.async_rollout` off and
  on: the median step time after the first step (`step/ms`), the sync time, the staleness;
- `group`: the tiny default recipe with 2 learners, 2 rollout and 2 reward workers on the same card (gloo, since
  NCCL takes one rank per card) and the weights broadcast over a collective (`runtime.weight_sync=collective`):
  that the learner group and the weight channel run on CUDA tensors.
`--tiny` runs all three with the tiny recipe on the CPU (to check the script). Each run's layout printout and
its last lines are kept in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_PATHS, ROOT  # the real-scale recipe's data and weight paths off

REAL = "recipes/sa2va/random_init/sa2va_4b_sft_dual.yaml"
TINY = "recipes/sft_dual.yaml"
COMMON = ["eval.at_start=false", "eval.every=1000", "train.save_every=1000", "train.log_every=1", "wandb.mode=disabled"]
COMMON += ["runtime.kind=ray"]


def launch(name: str, recipe: str, overrides: list[str], out_dir: Path, timeout_s: float) -> dict:
    out = out_dir / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    cmd = [sys.executable, "-m", "dualrl.launch", recipe, *COMMON, *overrides, f"output_dir={out}"]
    t0 = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        tail = ((err.stdout or b"") + (err.stderr or b"")).decode(errors="replace").splitlines()[-30:]
        return {"command": " ".join(cmd[1:]), "exit": "timeout", "wall_s": timeout_s, "tail": tail}
    wall = time.time() - t0
    text = done.stdout + done.stderr
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.endswith("layout:")), None)
    layout = []
    for line in lines[start + 1 :] if start is not None else []:
        if not line.startswith("  "):
            break
        layout.append(line.strip())
    result = {"command": " ".join(cmd[1:]), "exit": done.returncode, "wall_s": round(wall, 1), "layout": layout}
    if done.returncode != 0:
        result["tail"] = lines[-30:]
        return result
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "train/loss" in m]
    later = [m["step/ms"] for m in steps[1:]]
    result.update(
        first_step_ms=round(steps[0]["step/ms"], 1),
        median_step_ms=round(statistics.median(later), 1) if later else None,
        median_sync_ms=round(statistics.median(m["sync/ms"] for m in steps), 1),
        sync_bytes=steps[-1]["sync/bytes"],
        staleness=[m.get("async/staleness") for m in steps],
        last_loss=steps[-1]["train/loss"],
        summary=json.loads((out / "summary.json").read_text())["final"],
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe on the CPU, to check the script")
    parser.add_argument("--timeout-s", type=float, default=230.0, help="per run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT") or "/tmp/ray_one_gpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [f"train.steps={args.steps}"]
    if args.tiny:
        real, share = [TINY, "data.batch_size=4", "data.shapes.val_size=8", "model.max_caption_tokens=6"], []
    else:
        real = [REAL, *NO_PATHS, "data.shapes={image_size: 1024, val_size: 16}", "data.num_workers=6"]
        real += ["eval.batch_size=8"]
        share = ["runtime.worker_gpus=0.3", "runtime.worker_cpus=3"]
    group = ["runtime.learners=2", "runtime.rollout_workers=2", "runtime.reward_workers=2"]
    group += ["runtime.weight_sync=collective", "data.batch_size=8"]
    group_share = ["runtime.worker_gpus=0.15", "runtime.worker_cpus=1"] if not args.tiny else []
    runs = {
        "sync": (real[0], [*real[1:], *share, *steps]),
        "async": (real[0], [*real[1:], *share, *steps, "runtime.async_rollout=true"]),
        "group": (TINY, [*group, *group_share, *steps]),
    }
    results = {}
    for name, (recipe, overrides) in runs.items():
        results[name] = launch(name, recipe, overrides, out_dir, args.timeout_s)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "command"}), flush=True)
    sync, ahead = results["sync"].get("median_step_ms"), results["async"].get("median_step_ms")
    if sync and ahead:
        results["async_over_sync_step"] = round(ahead / sync, 3)
    path = args.out or out_dir / "ray_one_gpu.json"
    path.write_text(json.dumps(results, indent=1))
    print("written", path)
    return 0 if all(r["exit"] == 0 for r in results.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
