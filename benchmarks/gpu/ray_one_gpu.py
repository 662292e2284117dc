"""The Ray runtime on one GPU: the actors share the card through fractional GPU requests.

    python benchmarks/gpu/ray_one_gpu.py [--steps 8] [--runs NAME ...] [--tiny] [--out results.json]

Runs `python -m dualrl.launch` under `runtime.kind=ray` as a user would, on the built-in shapes data at the
recipe's working size, and reads the runs' metrics.jsonl:
- `object_store` / `cuda_ipc` / `async`: the Sa2VA-4B-shaped `sft_dual` recipe with random init
  (recipes/sa2va/random_init/), one learner, one rollout and one reward worker at `runtime.worker_gpus` 0.3 each;
  the weights through the object store, then through CUDA IPC (`runtime.weight_sync` auto on one card), then
  CUDA IPC with `runtime.async_rollout`: the median step time after the first step (`step/ms`), the sync time, the
  staleness;
- `group` / `group_ipc`: the tiny default recipe with 2 learners, 2 rollout and 2 reward workers on the same card
  (gloo, since NCCL takes one rank per card), the weights broadcast over a collective
  (`runtime.weight_sync=collective`), then shared by CUDA IPC: that the learner group and both weight paths run on
  CUDA tensors;
- `equivalence`: the tiny recipe (dropout off) with 1 learner and 2 micro-batches against 2 learners on the same
  global batch, on the card (gloo), in float32 and in bf16, and the 1-learner bf16 run repeated (the card's own
  run-to-run spread): the largest difference of trainable and EMA weights after the last step.
`--tiny` runs them with the tiny recipe on the CPU (to check the script; the CUDA IPC runs take the object store
there). Each run's layout printout, the weight path it logged and its last lines are kept in the results.
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
RUNS = ("object_store", "cuda_ipc", "async", "group", "group_ipc", "equivalence")
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
    path = next((line.split("through ", 1)[1] for line in lines if "weights reach the workers through" in line), None)
    result = {"command": " ".join(cmd[1:]), "exit": done.returncode, "wall_s": round(wall, 1), "layout": layout}
    result["weight_path"] = path
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
        median_phase_ms={  # after the first step: the driver's wait for captions and rewards, the calls, the update
            k: round(statistics.median(m[k] for m in steps[1:]), 1)
            for k in ("step/wait/ms", "step/rollout/ms", "step/reward/ms", "step/learn/ms")
            if len(steps) > 1 and k in steps[1]
        },
        sync_bytes=steps[-1]["sync/bytes"],
        staleness=[m.get("async/staleness") for m in steps],
        last_loss=steps[-1]["train/loss"],
        summary=json.loads((out / "summary.json").read_text())["final"],
    )
    return result


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return {
        f"{name}:{k}": v.float()
        for name in ("trainable", "ema")
        for k, v in load_file(step / f"{name}.safetensors").items()
    }


def equivalence(out_dir: Path, steps: list[str], share: list[str], timeout_s: float) -> dict:
    """1 learner with 2 micro-batches against 2 learners with one each, in float32 and bf16; the weights compared."""
    base = [*steps, *share, "model.trainable.lora_dropout=0.0", "data.batch_size=8"]
    one = ["runtime.learners=1", "optim.accumulation=2"]
    two = ["runtime.learners=2", "optim.accumulation=1"]
    arms = {
        "float32_one": [*base, *one, "model.precision=float32"],
        "float32_two": [*base, *two, "model.precision=float32"],
        "bf16_one": [*base, *one, "model.precision=bf16"],
        "bf16_two": [*base, *two, "model.precision=bf16"],
        "bf16_one_again": [*base, *one, "model.precision=bf16"],
    }
    result: dict = {}
    for name, overrides in arms.items():
        result[name] = launch(f"equivalence_{name}", TINY, overrides, out_dir, timeout_s)
        print(name, result[name].get("exit"), result[name].get("wall_s"), flush=True)
    if any(r["exit"] != 0 for r in result.values()):
        result["exit"] = 1
        return result
    weights = {name: _weights(out_dir / f"equivalence_{name}") for name in arms}
    for a, b, key in [
        ("float32_one", "float32_two", "float32_max_abs_diff"),
        ("bf16_one", "bf16_two", "bf16_max_abs_diff"),
        ("bf16_one", "bf16_one_again", "bf16_repeat_max_abs_diff"),
        ("float32_one", "bf16_one", "float32_against_bf16_max_abs_diff"),  # the scale: what precision alone moves
    ]:
        x, y = weights[a], weights[b]
        assert x.keys() == y.keys(), (a, b)
        result[key] = max((x[k] - y[k]).abs().max().item() for k in x)
    result["largest_weight"] = max(v.abs().max().item() for v in weights["float32_one"].values())
    result["exit"] = 0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe on the CPU, to check the script")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
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
    group = ["runtime.learners=2", "runtime.rollout_workers=2", "runtime.reward_workers=2", "data.batch_size=8"]
    group_share = ["runtime.worker_gpus=0.15", "runtime.worker_cpus=1"] if not args.tiny else []
    ipc = [] if args.tiny else ["runtime.weight_sync=cuda_ipc"]
    runs = {
        "object_store": (real[0], [*real[1:], *share, *steps, "runtime.weight_sync=object_store"]),
        "cuda_ipc": (real[0], [*real[1:], *share, *steps, "runtime.weight_sync=auto"]),
        "async": (real[0], [*real[1:], *share, *steps, *ipc, "runtime.async_rollout=true"]),
        "group": (TINY, [*group, *group_share, *steps, "runtime.weight_sync=collective"]),
        "group_ipc": (TINY, [*group, *group_share, *steps, *ipc]),
    }
    results = {}
    for name in args.runs:
        if name == "equivalence":
            results[name] = equivalence(out_dir, steps, group_share, args.timeout_s)
            print(name, json.dumps({k: v for k, v in results[name].items() if not isinstance(v, dict)}), flush=True)
            continue
        recipe, overrides = runs[name]
        results[name] = launch(name, recipe, overrides, out_dir, args.timeout_s)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "command"}), flush=True)
    step = {name: r.get("median_step_ms") for name, r in results.items()}
    sync = {name: r.get("median_sync_ms") for name, r in results.items()}
    if step.get("object_store") and step.get("cuda_ipc"):
        results["cuda_ipc_over_object_store_step"] = round(step["cuda_ipc"] / step["object_store"], 3)
        results["cuda_ipc_over_object_store_sync"] = round(sync["cuda_ipc"] / sync["object_store"], 4)
    if step.get("cuda_ipc") and step.get("async"):
        results["async_over_sync_step"] = round(step["async"] / step["cuda_ipc"], 3)
    path = args.out or out_dir / "ray_one_gpu.json"
    path.write_text(json.dumps(results, indent=1))
    print("written", path)
    return 0 if all(r["exit"] == 0 for r in results.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
