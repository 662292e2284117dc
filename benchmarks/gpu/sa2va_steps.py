"""Sa2VA-sized dualrl steps on one GPU: time per phase and peak memory.

    python benchmarks/gpu/sa2va_steps.py [--recipe recipes/sa2va/sa2va_4b_sft_dual.yaml] [--steps 4]
        [--algos sft_dual grpo] [--batch-size 4] [--generations 4] [--accumulation 1] [--cache dynamic|static]
        [--tiny] [--out results.json]

Builds the recipe's model with random init (no weights can be downloaded where this runs; speed does not
depend on weight values), in the local runtime, on the built-in shapes data drawn at the recipe's working
size (1024: SAM2's input; the VLM takes its 448 tile from it), and runs `--steps` training steps of each
algorithm through the same workers the driver uses: rollout (captions), reward (EMA segmentation + rewards),
learner (one optimizer step, then the EMA sent to the teacher: `update_s` + `sync_s` = `learner_s`;
`sync_host_s` times the same sync through host memory, as before 0.4, for comparison). Each phase is timed
with CUDA synchronisation; the first step is the warm-up and is reported apart. Peak GPU memory is
`torch.cuda.max_memory_allocated` over each algorithm's steps (the build included). `--tiny` swaps in the
tiny model section of recipes/sft_dual.yaml to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
try:  # trl imports `datasets` at module level for its trainers; dualrl takes two tensor functions from trl
    import datasets  # noqa: F401
except ImportError:  # the GPU machine has no `datasets` (pyarrow alone is over its upload limit): a stand-in
    import types

    sys.modules["datasets"] = types.ModuleType("datasets")
    sys.modules["datasets"].IterableDataset = type("IterableDataset", (), {})

from dualrl.algo.objectives import OBJECTIVES  # noqa: E402
from dualrl.algo.rollout import Rollout  # noqa: E402
from dualrl.data.loader import train_batches  # noqa: E402
from dualrl.model.build import memory_estimate  # noqa: E402
from dualrl.recipe import load_recipe  # noqa: E402
from dualrl.runtime import start_runtime  # noqa: E402
from dualrl.train import ROLLOUT_SEED, step_generator, step_seed  # noqa: E402

TINY_MODEL = ["model.vision.hidden_size=64", "model.vision.layers=2", "model.vision.heads=2",
              "model.vision.intermediate_size=256", "model.vision.image_size=128", "model.vision.patch_size=8",
              "model.text.hidden_size=128", "model.text.layers=2", "model.text.heads=4", "model.text.kv_heads=2",
              "model.text.intermediate_size=512", "model.text.vocab_size=512", "model.sam.image_size=128",
              "model.sam.config=configs/sam2.1/sam2.1_hiera_t.yaml", "model.trainable.lora_r=8",
              "model.trainable.lora_alpha=16", "model.max_caption_tokens=8", "algo.loss.num_points=256",
              "model.precision=float32", "model.sam.overrides=" + json.dumps(
                  ["++model.image_encoder.trunk.embed_dim=32", "++model.image_encoder.trunk.num_heads=1",
                   "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
                   "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
                   "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
                   "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
                   "++model.use_high_res_features_in_sam=false"])]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_sa2va_checkpoint(args, out_dir: Path) -> tuple[Path, dict]:
    """The recipe's model with random init, written as a Sa2VA HF directory (bf16, 5 GB shards), so that the
    steps then build from it as from a real checkpoint (`model.sa2va`): the load path's build time."""
    from dualrl.model.build import build_model
    from dualrl.model.sa2va_format import save_sa2va

    recipe = load_recipe(args.recipe, [f"output_dir={out_dir / 'x'}", "model.sa2va=null", "model.init_from=null",
                                       "data.refcoco=null", "data.sa1b=null", "data.sav=null", "data.openimages=null",
                                       "data.shapes={}", "data.eval_source=shapes",
                                       "model.trainable.lora=false", *(TINY_MODEL if args.tiny else [])])
    t0 = time.perf_counter()
    model = build_model(recipe.model)
    t1 = time.perf_counter()
    directory = save_sa2va(model, model.tokenizer, out_dir / "sa2va", dtype=torch.bfloat16, shard_bytes=5 * 2**30)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in directory.iterdir())
    del model
    return directory, {"random_build_s": t1 - t0, "save_s": t2 - t1, "checkpoint_gib": size / 2**30}


class _Timed:
    """Marks, with CUDA synchronisation, when the learner's objective (forward) and optimizer step start and end,
    to split `update_s` into forward, backward (+ clipping) and optimizer (+ EMA) parts."""

    def __init__(self, learner):
        self.marks: list[tuple[str, float]] = []
        objective, step = learner.objective, learner.optimizer.step

        class Objective:
            def __getattr__(_, name):
                return getattr(objective, name)

            def __call__(_, *a, **k):
                self.mark("forward")
                out = objective(*a, **k)
                self.mark("backward")
                return out

        def optimizer_step(*a, **k):
            self.mark("optimizer")
            return step(*a, **k)

        learner.objective, learner.optimizer.step = Objective(), optimizer_step

    def mark(self, name: str) -> None:
        sync()
        self.marks.append((name, time.perf_counter()))

    def split(self, start: float, end: float) -> dict[str, float]:
        """Seconds per part since `start`; the marks are then cleared."""
        out = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        times = [*self.marks, ("end", end)]
        for (name, t), (_, t_next) in itertools.pairwise(times):
            out[f"{name}_s"] += t_next - t
        out["other_s"] = (end - start) - sum(out.values())
        self.marks.clear()
        return out


def run_algo(args, algo: str, out_dir: Path, sa2va: Path | None = None, workers: int = 2) -> dict:
    size = 128 if args.tiny else 1024
    overrides = [
        f"output_dir={out_dir / algo}", f"model.sa2va={sa2va or 'null'}", "model.init_from=null", f"algo.name={algo}",
        "data.refcoco=null", "data.sa1b=null", "data.sav=null", "data.openimages=null", "data.eval_source=shapes",
        f"data.shapes={{image_size: {size}}}", "data.expression_fraction=0.3",
        f"data.image_size={size}", f"data.num_workers={workers}", f"data.batch_size={args.batch_size}",
        f"algo.grpo.num_generations={args.generations}", f"optim.accumulation={args.accumulation}",
        f"model.generation_cache={args.cache}",
        "wandb.mode=disabled", "train.device=auto",
        "rewards=[{name: mask_iou}]", *(TINY_MODEL if args.tiny else []),
    ]
    recipe = load_recipe(args.recipe, overrides)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    runtime = start_runtime(recipe)
    sync()
    build_s = time.perf_counter() - t0
    estimate = memory_estimate(runtime.learner.model)
    built_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    plan = OBJECTIVES[algo].plan(recipe)
    timer = _Timed(runtime.learner)
    batches = train_batches(recipe)
    phases: list[dict[str, float]] = []
    for step in range(1, args.steps + 1):
        batch = next(batches)
        sync()
        t = time.perf_counter()
        captions = runtime.rollout.describe(batch, plan, ROLLOUT_SEED + step_seed(recipe.train.seed, step))
        sync()
        t_roll = time.perf_counter()
        scored = runtime.reward.score(batch, captions, plan.group_size)
        sync()
        t_reward = time.perf_counter()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0
        metrics = runtime.learner.step(batch, Rollout(captions, plan.group_size, scored.total),
                                       step_generator(recipe.train.seed, step))
        sync()
        t_update = time.perf_counter()
        runtime.sync()
        sync()
        t_learn = time.perf_counter()
        runtime.reward.load_weights(runtime.learner.sync_state("ema"))  # the host round trip, same tensors
        sync()
        sync_host_s = time.perf_counter() - t_learn
        retries = (torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0) - retries
        parts = timer.split(t_reward, t_update)
        phases.append({"rollout_s": t_roll - t, "reward_s": t_reward - t_roll, "learner_s": t_learn - t_reward,
                       **parts,
                       "update_s": t_update - t_reward, "sync_s": t_learn - t_update, "sync_host_s": sync_host_s,
                       "step_s": t_learn - t,
                       "loss": metrics["train/loss"], "alloc_retries": float(retries),
                       "mask_cover": float(batch["masks"].float().mean()),
                       "caption_tokens": sum(len(i) for i in captions.ids) / len(captions)})
        print(f"{algo} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in phases[-1].items()), flush=True)
    batches.close()
    timed = phases[1:] or phases
    result = {
        "algo": algo, "regions_per_step": recipe.data.batch_size, "captions_per_region": plan.group_size,
        "loader_workers": workers,
        "build_s": build_s, "estimate": estimate, "memory_after_build_gib": built_gib,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "warmup_step": phases[0],
        "median": {k: statistics.median(p[k] for p in timed)
                   for k in ("rollout_s", "reward_s", "learner_s", "update_s", "forward_s", "backward_s", "optimizer_s",
                             "other_s", "sync_s", "sync_host_s", "step_s")},
        "steps": phases,
    }
    runtime.shutdown()
    del runtime
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/sa2va/sa2va_4b_sft_dual.yaml"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--algos", nargs="+", default=["sft_dual", "grpo"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (the 2026-11-26 "
                        "results ran whole batches)")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="generation KV cache")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="data loader processes; several "
                        "values run each algorithm once per value")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--from-sa2va", action="store_true", help="write the random-init model as a Sa2VA "
                        "directory first and build the runs from it (the load path's build time)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import transformers

    facts = {"torch": torch.__version__, "transformers": transformers.__version__,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "recipe": args.recipe, "tiny": args.tiny}
    print(json.dumps(facts), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sa2va = None
        if args.from_sa2va:
            sa2va, facts["sa2va_checkpoint"] = write_sa2va_checkpoint(args, Path(tmp))
            print(json.dumps(facts["sa2va_checkpoint"]), flush=True)
        for workers in args.workers:
            for algo in args.algos:
                results.append(run_algo(args, algo, Path(tmp), sa2va, workers))
                gc_cuda()
    for r in results:
        m = r["median"]
        print(f"{r['algo']:9s} ({r['loader_workers']} loader workers) {r['regions_per_step']} regions x "
              f"{r['captions_per_region']} captions: rollout "
              f"{m['rollout_s']:.3f} s, reward {m['reward_s']:.3f} s, learner {m['learner_s']:.3f} s (update "
              f"{m['update_s']:.3f} + sync {m['sync_s']:.3f}; host sync {m['sync_host_s']:.3f}), step "
              f"{m['step_s']:.3f} s (median after warm-up); peak {r['peak_memory_gib']} GiB; "
              f"build {r['build_s']:.1f} s")
        print(f"          {r['estimate']}")
    if args.out:
        args.out.write_text(json.dumps({"facts": facts, "results": results}, indent=1))
    return 0


def gc_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
