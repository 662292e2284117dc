"""Sa2VA-sized dualrl steps on one GPU: time per phase and peak memory.

    python benchmarks/gpu/sa2va_steps.py [--recipe recipes/sa2va/random_init/sa2va_4b_sft_dual.yaml] [--steps 4]
        [--warmup 1] [--algos sft_dual grpo] [--batch-size 4] [--generations 4] [--accumulation 1]
        [--generation engine|generate]
        [--cache dynamic|static] [--naive-regions 2] [--compare-compile] [--compare-wrapper] [--compare-token-rows]
        [--compare-threads 1 16] [--compare-encodings] [--compare-projections] [--flops-each] [--set KEY=VALUE ...]
        [--tiny]
        [--out results.json]

Builds the recipe's model with random init (no weights can be downloaded where this runs; speed does not
depend on weight values), in the local runtime, on the built-in shapes data drawn at the recipe's working
size (1024: SAM2's input; the VLM takes its 448 tile from it), and runs `--steps` training steps of each
algorithm through the same workers the driver uses: rollout (captions), reward (EMA segmentation + rewards),
learner (one optimizer step, then the EMA sent to the teacher: `update_s` + `sync_s` = `learner_s`;
`sync_host_s` times the same sync through host memory, as before 0.4, for comparison). Each phase is timed
with CUDA synchronisation; the first `--warmup` steps (1) are the warm-up, reported apart (`warmup_steps`). Peak GPU
memory is `torch.cuda.max_memory_allocated` over each algorithm's build and timed steps (not the FLOP count's
update). `--tiny` swaps in the tiny model section of recipes/sft_dual.yaml to check the script on a CPU.

After the timed steps: the learner's model FLOPs of one update (torch's flop counter, recomputation off) over the
median update time give its MFU against the card's datasheet bf16 peak and against the measured matrix rate; with
`--flops-each`, each timed update's FLOPs are counted on its own batch, and `timed_mfu` is their sum over the timed
updates' time; with `--naive-regions`, the naive dual loop (one caption at a time with `generate`'s dynamic cache,
every image encoded again for every caption and every segmentation) runs on the same batch, and `naive_speedup` is
its step time (naive rollout + naive reward + the same learner update) over dualrl's. With `--compare-compile`, the
learner update on the last batch is timed eagerly and then with its repeated blocks compiled
(`model.train_compile`), same model and process (the first compiled update, which compiles, timed apart), and MFU is
given for both. With
`--compare-wrapper` (and `model.train_compile=true`), the compiled update on the last batch alternates between
inductor's Python and C++ wrappers (`model.train_compile_wrapper`). With `--compare-threads`, the update on the last
batch alternates between torch thread counts in the training process (`train.threads`), each with the region cells
found by block sums (dualrl's) and by pooling a float copy of the masks (before 0.5). With `--compare-encodings`,
the update on the last batch alternates between its micro-batches taking their rows of the teacher's encoding
(dualrl's) and each encoding its own images (before 0.5, with `--accumulation` > 1). With `--compare-projections`,
the timed steps' updates run again on their own batches, each once with the LLM's sibling projections as the recipe
has them and once grouped (`model.train_fuse_projections`), alternating which goes first, after one untimed pass of
the other kind over them (it compiles and meets their sizes): each kind's update times and, with `--flops-each`,
its MFU over the same FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_PATHS, ROOT, TINY_MODEL, ceilings, compiled_blocks, facts, sync

from dualrl.algo.losses import mask_iou
from dualrl.algo.registry import objective_class
from dualrl.algo.rollout_data import Rollout, micro_batches
from dualrl.data.loader import train_batches
from dualrl.model.build import memory_estimate
from dualrl.model.decode_attention import attention_implementation
from dualrl.model.grounded_vlm import LastEncoding
from dualrl.model.sequence import Assembler, Ids
from dualrl.model.token_rows import TokenRowsLayer
from dualrl.recipe import load_recipe
from dualrl.runtime import resolve_device, set_intra_op_threads, start_runtime
from dualrl.train import ROLLOUT_SEED, PauseClock, step_generator, step_seed

# Dense bf16 matrix peak of the card by its datasheet (H100 / H200 SXM), for MFU
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12}


def write_sa2va_checkpoint(args, out_dir: Path) -> tuple[Path, dict]:
    """The recipe's model with random init, written as a Sa2VA HF directory (bf16, 5 GB shards), so that the
    steps then build from it as from a real checkpoint (`model.sa2va`): the load path's build time."""
    from dualrl.model.build import build_model
    from dualrl.model.sa2va_format import save_sa2va

    recipe = load_recipe(
        args.recipe,
        [
            f"output_dir={out_dir / 'x'}",
            *NO_PATHS,
            "data.shapes={}",
            "model.trainable.lora=false",
            *(TINY_MODEL if args.tiny else []),
        ],
    )
    t0 = time.perf_counter()
    model = build_model(recipe.model)
    t1 = time.perf_counter()
    directory = save_sa2va(model, model.tokenizer, out_dir / "sa2va", dtype=torch.bfloat16, shard_bytes=5 * 2**30)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in directory.iterdir())
    del model
    return directory, {"random_build_s": t1 - t0, "save_s": t2 - t1, "checkpoint_gib": size / 2**30}


class _Sizes:
    """Records the sizes of the right-padded LLM batches a driver step's learner updates assemble in this process
    (rows, width, longest row): how many of them no earlier step met (`new_sizes`: first contact with a size), and
    the share of their tokens that are padding past each batch's longest row (`width_waste`). `Assembler.__call__`
    records only inside `update`; a step that assembled nothing here (a Ray learner) records None."""

    def __init__(self):
        self.seen: set[tuple[int, int]] = set()

    @contextlib.contextmanager
    def update(self, out: dict):
        """Records the sizes assembled inside the block into `out`."""
        sizes: list[tuple[int, int, int]] = []
        call = Assembler.__call__

        def recording(assembler, prompts, pad_left=False):
            seq = call(assembler, prompts, pad_left)
            if not pad_left:
                sizes.append((len(seq.lengths), seq.inputs_embeds.shape[1], max(seq.lengths)))
            return seq

        Assembler.__call__ = recording
        try:
            yield
        finally:
            Assembler.__call__ = call
            new = {(r, w) for r, w, _ in sizes} - self.seen
            self.seen |= new
            cells = sum(r * w for r, w, _ in sizes)
            out.update(
                sizes=[list(x) for x in sizes] if sizes else None,
                new_sizes=float(len(new)) if sizes else None,
                width_waste=sum(r * (w - n) for r, w, n in sizes) / cells if cells else None,
            )


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


def run_algo(
    args, algo: str, out_dir: Path, sa2va: Path | None = None, workers: int = 2, save=lambda partial: None
) -> dict:
    size = 128 if args.tiny else 1024
    overrides = [
        f"output_dir={out_dir / algo}",
        *NO_PATHS,
        f"model.sa2va={sa2va or 'null'}",
        f"algo.name={algo}",
        f"data.shapes={{image_size: {size}}}",
        "data.expression_fraction=0.3",
        f"data.image_size={size}",
        f"data.num_workers={workers}",
        f"data.batch_size={args.batch_size}",
        f"algo.grpo.num_generations={args.generations}",
        f"optim.accumulation={args.accumulation}",
        f"model.generation={args.generation}",
        f"model.generation_cache={args.cache}",
        "wandb.mode=disabled",
        "train.device=auto",
        "rewards=[{name: mask_iou}]",
        *(TINY_MODEL if args.tiny else []),
        *args.set,
    ]
    recipe = load_recipe(args.recipe, overrides)
    set_intra_op_threads(recipe.train.threads, resolve_device(recipe.train.device))  # as the driver does
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # random init where the model lives: seconds on a GPU against minutes on the host's cores
    with torch.device("cuda") if torch.cuda.is_available() and not sa2va else contextlib.nullcontext():
        runtime = start_runtime(recipe)
    sync()
    build_s = time.perf_counter() - t0
    estimate = memory_estimate(runtime.learner.model)
    built_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    plan = objective_class(recipe.algo).plan(recipe)
    timer = _Timed(runtime.learner)
    sizes = _Sizes()
    batches = train_batches(recipe.data, recipe.model.sam.image_size, pin=torch.cuda.is_available())  # as the driver
    phases: list[dict] = []  # per step: seconds per phase, counts, and the update's sizes
    kept: list[tuple[dict, Rollout, int]] = []  # the timed steps' inputs, for their FLOPs (--flops-each)
    pauses = PauseClock()  # Python's cyclic collector: its time in each update and in the rest of each step
    for step in range(1, args.steps + 1):
        batch = next(batches)
        sync()
        pauses.take()
        t = time.perf_counter()
        captions = runtime.rollout.describe(batch, plan, ROLLOUT_SEED + step_seed(recipe.train.seed, step))
        sync()
        t_roll = time.perf_counter()
        scored = runtime.reward.score(batch, captions, plan.group_size)
        sync()
        t_reward = time.perf_counter()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0
        segments = cuda_segments()
        rollout = Rollout(captions, plan.group_size, scored.total)
        gc_before_s, _ = pauses.take()
        shapes: dict = {}
        with sizes.update(shapes):
            metrics = runtime.learner.step(batch, rollout, step_generator(recipe.train.seed, step))
        if (args.flops_each or args.replay or args.compare_projections) and step > args.warmup:
            kept.append((batch, rollout, step))
        sync()
        t_update = time.perf_counter()
        gc_update_s, gc_update_full = pauses.take()
        segments = cuda_segments() - segments  # the update's own (the sync below allocates nothing new)
        runtime.sync()
        sync()
        t_learn = time.perf_counter()
        runtime.reward.load_weights(runtime.learner.sync_state("ema"))  # the host round trip, same tensors
        sync()
        sync_host_s = time.perf_counter() - t_learn
        retries = (torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0) - retries
        parts = timer.split(t_reward, t_update)
        phases.append(
            {
                "rollout_s": t_roll - t,
                "reward_s": t_reward - t_roll,
                "learner_s": t_learn - t_reward,
                **parts,
                "update_s": t_update - t_reward,
                "sync_s": t_learn - t_update,
                "sync_host_s": sync_host_s,
                "step_s": t_learn - t,
                "loss": metrics["train/loss"],
                "alloc_retries": float(retries),
                "new_segments": float(segments),
                "mask_cover": float(batch["masks"].float().mean()),
                "gc_update_s": gc_update_s,
                "gc_update_full": float(gc_update_full),
                "gc_rest_s": gc_before_s + pauses.take()[0],
                "caption_tokens": sum(len(i) for i in captions.ids) / len(captions),
                **shapes,
            }
        )
        print(
            f"{algo} step {step}: "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in phases[-1].items()),
            flush=True,
        )
    batches.close()
    pauses.close()
    timed = phases[args.warmup :]
    median = {
        k: statistics.median(p[k] for p in timed)
        for k in (
            "rollout_s",
            "reward_s",
            "learner_s",
            "update_s",
            "forward_s",
            "backward_s",
            "optimizer_s",
            "other_s",
            "sync_s",
            "sync_host_s",
            "step_s",
        )
    }
    steps_peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    partial = {"algo": algo, "partial": True, "steps": phases, "median": median, "collector": collection_costs()}
    save(partial)  # the timed steps, kept if a later stage does not finish
    rollout = Rollout(captions, plan.group_size, scored.total)
    compiled = None
    repeats = max(2, args.steps - args.warmup)  # each comparison's updates of each kind: as many as the timed steps
    if args.compare_compile:
        compiled = compare_compile(runtime.learner, batch, rollout, recipe.train.seed, repeats)
        timer.marks.clear()
    token_rows = wrapper = None
    if args.compare_wrapper:
        wrapper = compare_wrapper(runtime.learner, batch, rollout, recipe.train.seed, repeats)
    if args.compare_token_rows:
        token_rows = compare_token_rows(runtime.learner, batch, rollout, recipe.train.seed, repeats)
    encodings = (
        compare_encodings(runtime.learner, batch, rollout, recipe.train.seed, repeats)
        if args.compare_encodings
        else None
    )
    host = None
    if args.compare_threads:
        host = compare_host(runtime.learner, batch, rollout, recipe.train.seed, repeats, args)
        set_intra_op_threads(recipe.train.threads, resolve_device(recipe.train.device))
    replayed = replay(runtime.learner, kept, recipe.train.seed) if args.replay else None
    projections = compare_projections(runtime.learner, kept, recipe.train.seed) if args.compare_projections else None
    save({**partial, "compiled": compiled, "wrapper": wrapper, "replayed": replayed, "projections": projections})
    flops = learner_flops(runtime.learner, batch, rollout, step_generator(recipe.train.seed, args.steps + 1))
    peak = next((v for k, v in BF16_PEAK.items() if k in facts().get("device", "")), None)
    mfu = {
        "model_flops_per_update": flops,
        "achieved_flops_per_s": flops / median["update_s"],
        "mfu": flops / median["update_s"] / peak if peak else None,
        "mfu_of_measured_matmul": flops / median["update_s"] / args.rates["matmul_flops_per_s"],
        "mfu_compiled": flops / compiled["compiled_update_s"] / peak if peak and compiled else None,
        **(
            timed_mfu(runtime.learner, kept, timed, recipe.train.seed, peak, projections)
            if args.flops_each and kept
            else {}
        ),
        "gradient_checkpointing": recipe.model.gradient_checkpointing,
        "accumulation": recipe.optim.accumulation,
    }
    captions_per_step = recipe.data.batch_size * plan.group_size
    speed = {
        "regions_per_s": recipe.data.batch_size / median["step_s"],
        "captions_per_s": captions_per_step / median["step_s"],
    }
    naive = None
    if args.naive_regions:
        naive = naive_step(runtime, batch, plan, args.naive_regions)
        naive["naive_step_s"] = naive["naive_rollout_s"] + naive["naive_reward_s"] + median["learner_s"]
        naive["naive_regions_per_s"] = recipe.data.batch_size / naive["naive_step_s"]
        naive["naive_captions_per_s"] = captions_per_step / naive["naive_step_s"]
        speed["naive_speedup"] = naive["naive_step_s"] / median["step_s"]
    print(f"{algo}: {json.dumps({**mfu, **speed})}", flush=True)
    if args.profile_learner:
        profile_learner(
            runtime.learner,
            batch,
            rollout,
            step_generator(recipe.train.seed, args.steps + 2),
            args.out.parent if args.out else None,
            algo,
        )
    syncs = None
    if args.sync_sites:
        from tiny_steps import sync_sites

        syncs = {k: v for k, v in sync_sites(args, runtime, recipe, batch, rollout).items() if k != "text"}
    result = {
        "algo": algo,
        "regions_per_step": recipe.data.batch_size,
        "captions_per_region": plan.group_size,
        "loader_workers": workers,
        "build_s": build_s,
        "estimate": estimate,
        "memory_after_build_gib": built_gib,
        "peak_memory_gib": steps_peak_gib,  # the build and the timed steps (not the FLOP count's update)
        "warmup_steps": phases[: args.warmup],
        "median": median,
        "steps": phases,
        "collector": partial["collector"],
        "mfu": mfu,
        **speed,
        "naive": naive,
        "compiled": compiled,
        "token_rows": token_rows,
        "encodings": encodings,
        "wrapper": wrapper,
        "host": host,
        "replayed": replayed,
        "projections": projections,
        "sync_sites": syncs,
        "generation": recipe.model.generation,
    }
    runtime.shutdown()
    del runtime
    return result


def compare_compile(learner, batch: dict, rollout: Rollout, seed: int, steps: int) -> dict:
    """`steps` learner updates on one batch eagerly, then one (it compiles) and `steps` more with the learner's blocks
    compiled: the median update time of each and the peak memory of the compiled ones."""

    def timed(n: int, first: int) -> list[float]:
        times = []
        for i in range(n):
            sync()
            t = time.perf_counter()
            learner.step(batch, rollout, step_generator(seed, first + i))
            sync()
            times.append(time.perf_counter() - t)
        return times

    eager = statistics.median(timed(steps, 1000))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with compiled_blocks(learner):
        first = timed(1, 2000)[0]
        compiled = statistics.median(timed(steps, 2001))
    out = {
        "eager_update_s": eager,
        "compiled_update_s": compiled,
        "compiled_first_update_s": first,
        "speedup": eager / compiled,
        "compiled_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    print(f"compiled learner: {json.dumps(out)}", flush=True)
    return out


def compare_wrapper(learner, batch: dict, rollout: Rollout, seed: int, steps: int) -> dict:
    """Learner updates on one batch with the compiled blocks called by inductor's Python wrapper and by its C++ one
    (`model.train_compile_wrapper`), alternating, `steps` of each after one of each untimed (it compiles the wrapper
    the timed steps did not use): the median update time of each, and the untimed first ones."""
    from dualrl.model.train_compile import CompiledBlocks

    own = learner.compiled
    if own is None:
        raise ValueError("--compare-wrapper times compiled updates: set model.train_compile=true")
    blocks = {w: own if own.wrapper == w else CompiledBlocks(learner.model, w) for w in ("python", "cpp")}
    times: dict[str, list[float]] = {w: [] for w in blocks}
    try:
        for i in range(steps + 1):
            for name, compiled in blocks.items():
                learner.compiled = compiled
                sync()
                t = time.perf_counter()
                learner.step(batch, rollout, step_generator(seed, 4000 + i))
                sync()
                times[name].append(time.perf_counter() - t)
    finally:
        learner.compiled = own
    out = {f"{w}_update_s": statistics.median(v[1:]) for w, v in times.items()}
    out.update({f"{w}_first_update_s": v[0] for w, v in times.items()})
    out["speedup"] = out["python_update_s"] / out["cpp_update_s"]
    print(f"compiled wrappers: {json.dumps(out)}", flush=True)
    return out


@contextlib.contextmanager
def peft_token_rows(model: torch.nn.Module):
    """PEFT's own forward for the new tokens' rows (a merged copy of the matrix at every call) instead of dualrl's."""
    layers = [m for m in model.modules() if type(m) is TokenRowsLayer]
    for m in layers:
        m.__class__ = TrainableTokensLayer
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = TokenRowsLayer


def compare_token_rows(learner, batch: dict, rollout: Rollout, seed: int, steps: int) -> dict:
    """Learner updates on one batch with PEFT's token rows and with dualrl's, alternating, `steps` of each after one
    of each untimed: the median update time of each."""
    times: dict[str, list[float]] = {"peft": [], "dualrl": []}
    for i in range(steps + 1):
        for name in times:
            with peft_token_rows(learner.model) if name == "peft" else contextlib.nullcontext():
                sync()
                t = time.perf_counter()
                learner.step(batch, rollout, step_generator(seed, 3000 + i))
                sync()
            if i:
                times[name].append(time.perf_counter() - t)
    out = {f"{name}_update_s": statistics.median(v) for name, v in times.items()}
    out["speedup"] = out["peft_update_s"] / out["dualrl_update_s"]
    print(f"token rows: {json.dumps(out)}", flush=True)
    return out


def compare_encodings(learner, batch: dict, rollout: Rollout, seed: int, steps: int) -> dict:
    """Learner updates on one batch that the teacher has encoded, alternating: each micro-batch taking its rows of
    that encoding (dualrl's) and each encoding its own images (before 0.5 with `optim.accumulation` > 1), `steps` of
    each after one of each untimed: the median update time of each, and how many times an update ran the image
    encoders (`encode_pixels` and SAM2's alone), to show the two arms differ."""
    model = learner.model
    shared = model.encodings
    times: dict[str, list[float]] = {"own": [], "shared": []}
    runs: dict[str, int] = {}
    counted: list[int] = []
    encode_pixels, encode_sam = model.encode_pixels, model._encode_sam
    model.encode_pixels = lambda *a, **k: counted.append(1) or encode_pixels(*a, **k)
    model._encode_sam = lambda *a, **k: counted.append(1) or encode_sam(*a, **k)
    try:
        for i in range(steps + 1):
            for name in times:
                model.encodings = shared
                encoded_as_in_the_loop(learner, batch)
                if name == "own":
                    model.encodings = LastEncoding()  # nothing kept: every part encodes its images
                counted.clear()
                sync()
                t = time.perf_counter()
                learner.step(batch, rollout, step_generator(seed, 5000 + i))
                sync()
                runs[name] = len(counted)
                if i:
                    times[name].append(time.perf_counter() - t)
    finally:
        model.encodings = shared
        del model.encode_pixels, model._encode_sam
    out = {f"{name}_update_s": statistics.median(v) for name, v in times.items()}
    out["speedup"] = out["own_update_s"] / out["shared_update_s"]
    out.update({f"{name}_encoder_runs": n for name, n in runs.items()})
    out["micro_batches"] = len(micro_batches(batch, rollout, learner.optim_spec.accumulation * learner.rank.world))
    print(f"encodings: {json.dumps(out)}", flush=True)
    return out


def compare_host(learner, batch: dict, rollout: Rollout, seed: int, steps: int, args) -> dict:
    """Learner updates on one batch at each of `args.compare_threads` torch thread counts, with the region cells by
    block sums and by pooling, all alternating, `steps` of each after one of each untimed: the median update time of
    each, and each against one thread with block sums (the driver's default on a GPU)."""
    from dualrl.model import grounded_vlm

    def pooled(masks: torch.Tensor, side: int) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(masks.float().unsqueeze(1), side).flatten(1)

    blocks = grounded_vlm._cell_cover
    arms = [(n, cells) for n in args.compare_threads for cells in ("block_sums", "pooling")]
    times: dict[str, list[float]] = {f"threads_{n}_{cells}": [] for n, cells in arms}
    try:
        for i in range(steps + 1):
            for n, cells in arms:
                torch.set_num_threads(n)
                grounded_vlm._cell_cover = blocks if cells == "block_sums" else pooled
                sync()
                t = time.perf_counter()
                learner.step(batch, rollout, step_generator(seed, 5000 + i))
                sync()
                if i:
                    times[f"threads_{n}_{cells}"].append(time.perf_counter() - t)
    finally:
        grounded_vlm._cell_cover = blocks
    out = {f"{arm}_update_s": statistics.median(v) for arm, v in times.items()}
    base = out.get("threads_1_block_sums_update_s")
    if base:
        out.update({f"{arm}_over_1_thread_block_sums": out[f"{arm}_update_s"] / base for arm in times})
    print(f"host work: {json.dumps(out)}", flush=True)
    return out


def cuda_segments() -> int:
    """How many memory segments the caching allocator has taken from the driver so far (each a cudaMalloc)."""
    return torch.cuda.memory_stats().get("segment.all.allocated", 0) if torch.cuda.is_available() else 0


def collection_costs() -> dict:
    """What a full collection of Python's cyclic collector costs in this process now: the objects it tracks, a full
    collection's time (the second of two in a row, so the walk alone), and, where nothing is frozen, the same with the
    survivors frozen (`gc.freeze`, then unfrozen again): what a frozen heap would pay."""
    import gc

    def full() -> float:
        t = time.perf_counter()
        gc.collect()
        return time.perf_counter() - t

    full()
    out = {"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(), "full_collection_s": full()}
    if not out["frozen"]:
        gc.freeze()
        out["full_collection_after_freeze_s"] = full()
        gc.unfreeze()
    print(f"collector: {json.dumps(out)}", flush=True)
    return out


def replay(learner, kept: list, seed: int) -> dict:
    """The timed steps' updates again, on their own batches in the same order (every shape now seen once): each
    update's time and the allocator's new segments, then (on a GPU) each update's kernel time under a CUDA-only
    profiler; on a CPU the kernel lists stay empty rather than read 0. An update slower the first time than now paid
    for meeting its shapes; one as slow now, for its own work."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, list[float]] = {"update_s": [], "new_segments": [], "kernel_s": [], "profiled_update_s": []}
    for batch, rollout, step in kept:
        encoded_as_in_the_loop(learner, batch)
        segments = cuda_segments()
        sync()
        t = time.perf_counter()
        learner.step(batch, rollout, step_generator(seed, step))
        sync()
        out["update_s"].append(time.perf_counter() - t)
        out["new_segments"].append(float(cuda_segments() - segments))
    for batch, rollout, step in kept if torch.cuda.is_available() else []:  # no kernel time to read on a CPU
        encoded_as_in_the_loop(learner, batch)
        sync()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            learner.step(batch, rollout, step_generator(seed, step))
            sync()
        out["profiled_update_s"].append(time.perf_counter() - t)
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        out["kernel_s"].append(sum(e.self_device_time_total for e in kernels) / 1e6)
    print(f"replayed updates: {json.dumps(out)}", flush=True)
    return out


def compare_projections(learner, kept: list, seed: int) -> dict:
    """The timed steps' updates again on their own batches, each with the LLM's sibling projections computed one by
    one and grouped (`model.train_fuse_projections`), alternating which kind goes first from batch to batch, after
    one untimed pass over the batches of the kind the timed steps did not run (it compiles its blocks and meets the
    batches' sizes): each kind's update times in the batches' order, their sums' ratio, and the peak memory over the
    alternating updates (the grouped copies held throughout)."""
    from dualrl.model.train_projections import TrainProjections

    own = learner.projections
    kinds = {"plain": None, "grouped": own if own is not None else TrainProjections(learner.model.lm)}
    first_pass = "plain" if own is not None else "grouped"

    def update(kind: str, batch: dict, rollout: Rollout, step: int) -> float:
        learner.projections = kinds[kind]
        encoded_as_in_the_loop(learner, batch)
        sync()
        t = time.perf_counter()
        learner.step(batch, rollout, step_generator(seed, 6000 + step))
        sync()
        return time.perf_counter() - t

    out: dict[str, list[float] | float] = {"plain_update_s": [], "grouped_update_s": []}
    try:
        out["untimed_pass_s"] = sum(update(first_pass, b, r, s) for b, r, s in kept)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for i, (batch, rollout, step) in enumerate(kept):
            for kind in ("plain", "grouped") if i % 2 else ("grouped", "plain"):
                out[f"{kind}_update_s"].append(update(kind, batch, rollout, step))
    finally:
        learner.projections = own
    out["speedup"] = sum(out["plain_update_s"]) / sum(out["grouped_update_s"])
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(f"grouped projections: {json.dumps(out)}", flush=True)
    return out


def encoded_as_in_the_loop(learner, batch: dict) -> None:
    """The batch's images encoded as the teacher encodes them before each update in one process (no autograd, the
    model's autocast), outside any timing or count: the update then reuses that encoding, each micro-batch its rows
    of it (`GroundedVLM.share_frozen_encoders`: frozen encoders), as in the loop, and its time and FLOPs are those of
    the update the loop runs. With trainable encoders the update encodes for itself, in the loop as here."""
    with torch.no_grad(), learner.model.autocast():
        learner.model.encode_images(batch["images"])


def learner_flops(learner, batch: dict, rollout: Rollout, generator: torch.Generator) -> float:
    """Model FLOPs of one learner update (forward and backward; the matrix products, convolutions and attention
    that torch's flop counter knows), counted on one more update with activation recomputation switched off, so
    recomputed forward passes are not counted (MFU's convention), and with the LLM's attention run as transformers'
    eager matrix products (torch's counter rejects sdpa under grouped-query attention; both count the full square)."""
    recomputing = [m for m in learner.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    encoded_as_in_the_loop(learner, batch)
    for module in recomputing:
        module.gradient_checkpointing = False
    compiled, learner.compiled = learner.compiled, None  # the model's FLOPs, counted on eager operators
    try:  # eager attention: the same matrix products, which the counter knows also under grouped-query attention
        with attention_implementation(learner.model.lm.config, "eager"), FlopCounterMode(display=False) as counter:
            learner.step(batch, rollout, generator)
    finally:
        learner.compiled = compiled
        for module in recomputing:
            module.gradient_checkpointing = True
    sync()
    return float(counter.get_total_flops())


def timed_mfu(
    learner, kept: list, timed: list[dict], seed: int, peak: float | None, projections: dict | None = None
) -> dict:
    """MFU over the timed updates, each with its own batch's FLOPs (their prompts differ in length): the FLOPs of
    all of them over the time of all of them, and each update's own; with `projections` (--compare-projections),
    also each kind's MFU over its updates of the same batches."""
    flops = [learner_flops(learner, batch, rollout, step_generator(seed, step)) for batch, rollout, step in kept]
    times = [p["update_s"] for p in timed]
    each = [f / t / peak for f, t in zip(flops, times)] if peak else None
    out = {"timed_flops_per_update": flops, "timed_mfu": sum(flops) / sum(times) / peak if peak else None}
    for kind in ("plain", "grouped") if projections and peak else ():
        out[f"{kind}_projections_mfu"] = sum(flops) / sum(projections[f"{kind}_update_s"]) / peak
    print(f"timed updates, each with its own FLOPs: {json.dumps({**out, 'each_mfu': each})}", flush=True)
    return {**out, "timed_each_mfu": each}


MODEL_PARTS = (  # GroundedVLM methods an update calls, labelled in the profiled update's trace
    "encode_images",
    "project",
    "region_prompts",
    "lm_hidden",
    "logits_at",
    "lm_loss",
    "seg_queries",
    "decode_masks",
    "segment",
)


def profile_learner(
    learner, batch: dict, rollout: Rollout, generator: torch.Generator, out_dir: Path | None, name: str
) -> None:
    """torch.profiler over one learner update: operators by GPU and by host time, the share of the update's
    wall time its kernels fill (below 1: the host, not the GPU, sets the pace), and where the GPU sat idle
    (`gaps.py`: the model's methods labelled, each idle stretch charged to the place of the launch that ended it)."""
    from gaps import format_report, gap_report, labelled
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    parts = [(learner.model, MODEL_PARTS), (learner.objective, ("mask_terms",))]  # the optimizer labels itself
    sync()
    t = time.perf_counter()
    with labelled(parts, "update"), profile(activities=activities) as prof:
        learner.step(batch, rollout, generator)
        sync()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    kinds = kernel_kinds(events)
    gpu_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        gaps = gap_report(Path(tmp) / "trace.json")
    text = (
        f"one learner update under the profiler: wall {wall:.3f} s, kernel time {kernels:.3f} s "
        f"({kernels / wall:.2f} of the wall), {sum(e.count for e in events if e.device_type.name == 'CPU')} "
        f"host events\nkernel time by kind: "
        + ", ".join(f"{k} {v:.3f} s ({v / max(kernels, 1e-9):.0%})" for k, v in kinds.items())
        + "\nwhere the GPU waited:\n"
        + format_report(gaps)
        + "\n"
        + events.table(sort_by=gpu_key, row_limit=30)
        + "\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=30)
    )
    print(text, flush=True)
    if out_dir:
        (out_dir / f"learner_profile_{name}.txt").write_text(text)
        (out_dir / f"learner_gaps_{name}.json").write_text(json.dumps(gaps, indent=1))


KERNEL_KINDS = (  # (kind, name fragments), first match wins; matched against lower-cased kernel names
    ("attention", ("flash", "sdpa", "attention", "fmha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul", "conv")),
    ("compiled (triton)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cat", "index")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("reduction / norm", ("reduce", "norm", "softmax", "sum")),
    ("elementwise", ("elementwise",)),
)


def kernel_kinds(events) -> dict[str, float]:
    """Seconds of kernel time by kind of kernel (matmul, attention, triton code, copies, ...), largest first."""
    out: dict[str, float] = {}
    for e in events:
        if e.device_type.name != "CUDA":
            continue
        name = e.key.lower()
        kind = next((k for k, parts in KERNEL_KINDS if any(p in name for p in parts)), "other")
        out[kind] = out.get(kind, 0.0) + e.self_device_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@torch.no_grad()
def naive_step(runtime, batch: dict, plan, regions: int) -> dict:
    """The dual loop without dualrl's batching, on the same batch: one caption at a time with `generate`'s
    dynamic cache, the image encoded again for every caption and again for every segmentation. It runs the
    first `regions` regions and is scaled to the batch (one caption after another: each costs the same)."""
    roll, seg = runtime.rollout.model, runtime.reward.model
    roll.eval()
    n = min(regions, len(batch["masks"]))
    spec = roll.spec
    roll.spec = spec.model_copy(update={"generation": "generate", "generation_cache": "dynamic"})
    max_new = plan.max_new_tokens or spec.max_caption_tokens
    captions = []
    try:
        sync()
        t0 = time.perf_counter()
        with roll.autocast():
            for i in range(n):
                for _ in range(plan.group_size):
                    roll.encodings.clear()
                    c = roll.describe(
                        batch["images"][i : i + 1],
                        batch["masks"][i : i + 1],
                        sample=plan.sample,
                        temperature=plan.temperature,
                        top_p=plan.top_p,
                        max_new_tokens=max_new,
                    )
                    captions.append((i, c.ids[0]))
        sync()
        t1 = time.perf_counter()
        with seg.autocast():
            for i, ids in captions:
                seg.encodings.clear()
                logits, *_ = seg.segment(batch["images"][i : i + 1], [Ids(ids)])
                mask_iou(logits.float(), batch["masks"][i : i + 1].to(logits.device))
        sync()
        t2 = time.perf_counter()
    finally:
        roll.spec = spec
    scale = len(batch["masks"]) / n
    return {
        "naive_rollout_s": (t1 - t0) * scale,
        "naive_reward_s": (t2 - t1) * scale,
        "naive_regions_run": n,
        "naive_captions_run": len(captions),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/sa2va/random_init/sa2va_4b_sft_dual.yaml"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="steps before the timed ones (the first compiles; later ones show the cost of first contact with new "
        "shapes, which a long run pays only early): medians, MFU and --flops-each/--replay use the steps after them",
    )
    parser.add_argument("--algos", nargs="+", default=["sft_dual", "grpo"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument(
        "--accumulation", type=int, default=1, help="micro-batches per step (the 2026-11-26 results ran whole batches)"
    )
    parser.add_argument("--generation", choices=("engine", "generate"), default="engine", help="caption decoding")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="generate's KV cache")
    parser.add_argument(
        "--naive-regions",
        type=int,
        default=0,
        help="run the naive dual loop on this many regions of the last batch and scale it to the batch (0: off)",
    )
    parser.add_argument("--profile-learner", action="store_true", help="profile one more learner update")
    parser.add_argument(
        "--flops-each",
        action="store_true",
        help="count each timed update's FLOPs on its own batch (one more update each): timed_mfu is all their FLOPs "
        "over all their time (mfu divides the last batch's FLOPs by the median update)",
    )
    parser.add_argument(
        "--replay",
        action="store_true",
        help="after the timed steps, their updates again on the same batches: times, new allocator segments, kernel "
        "time (tells the cost of new shapes from the cost of each batch's own work)",
    )
    parser.add_argument(
        "--sync-sites", action="store_true", help="list the ops of one more learner update that make the host wait"
    )
    parser.add_argument(
        "--compare-compile",
        action="store_true",
        help="time the learner update eagerly and with its blocks compiled (model.train_compile), in this process",
    )
    parser.add_argument(
        "--compare-wrapper",
        action="store_true",
        help="time the compiled learner update with inductor's Python and C++ wrappers (model.train_compile_wrapper), "
        "alternating; needs model.train_compile=true",
    )
    parser.add_argument(
        "--compare-token-rows",
        action="store_true",
        help="time the learner update with PEFT's token rows and with dualrl's (model/token_rows.py), alternating",
    )
    parser.add_argument(
        "--compare-encodings",
        action="store_true",
        help="time the learner update with its micro-batches taking their rows of the teacher's encoding and with "
        "each encoding its own images, alternating (use with --accumulation 2 or more)",
    )
    parser.add_argument(
        "--compare-projections",
        action="store_true",
        help="the timed steps' updates again on their batches, with the LLM's sibling projections one by one and "
        "grouped (model.train_fuse_projections), alternating; with --flops-each, each kind's MFU",
    )
    parser.add_argument(
        "--compare-threads",
        type=int,
        nargs="*",
        default=[],
        help="time the learner update at these torch thread counts, each with the region cells by block sums and by "
        "pooling, alternating",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="more recipe overrides, e.g. model.gradient_checkpointing=false"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[2],
        help="data loader processes; several values run each algorithm once per value",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--from-sa2va",
        action="store_true",
        help="write the random-init model as a Sa2VA "
        "directory first and build the runs from it (the load path's build time)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must leave a timed step: 0 <= --warmup < --steps ({args.steps})")
    info = {**facts(), "recipe": args.recipe, "tiny": args.tiny, "set": args.set}
    args.rates = ceilings("cuda" if torch.cuda.is_available() else "cpu")
    info["ceilings"] = args.rates
    print(json.dumps(info), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sa2va = None
        if args.from_sa2va:
            sa2va, info["sa2va_checkpoint"] = write_sa2va_checkpoint(args, Path(tmp))
            print(json.dumps(info["sa2va_checkpoint"]), flush=True)
        for workers in args.workers:
            for algo in args.algos:
                # what is measured so far is written as it comes: a run cut short by its time limit keeps it
                save = lambda partial: _write(args.out, info, [*results, partial], complete=False)  # noqa: E731
                results.append(run_algo(args, algo, Path(tmp), sa2va, workers, save))
                gc_cuda()
                _write(args.out, info, results, complete=False)
    for r in results:
        m = r["median"]
        print(
            f"{r['algo']:9s} ({r['loader_workers']} loader workers) {r['regions_per_step']} regions x "
            f"{r['captions_per_region']} captions: rollout "
            f"{m['rollout_s']:.3f} s, reward {m['reward_s']:.3f} s, learner {m['learner_s']:.3f} s (update "
            f"{m['update_s']:.3f} + sync {m['sync_s']:.3f}; host sync {m['sync_host_s']:.3f}), step "
            f"{m['step_s']:.3f} s (median after warm-up); peak {r['peak_memory_gib']} GiB; "
            f"build {r['build_s']:.1f} s"
        )
        print(f"          {r['estimate']}")
        mfu = r["mfu"]
        print(
            f"          {r['regions_per_s']:.2f} regions/s, {r['captions_per_s']:.2f} captions/s; learner "
            f"{mfu['model_flops_per_update'] / 1e12:.1f} TFLOP an update, MFU {mfu['mfu'] or 0:.3f} "
            f"({mfu['mfu_of_measured_matmul']:.3f} of the measured matmul rate)"
            + (
                f"; naive loop {r['naive']['naive_step_s']:.1f} s a step: {r['naive_speedup']:.1f}x"
                if r["naive"]
                else ""
            )
        )
        if r["compiled"]:
            c = r["compiled"]
            print(
                f"          compiled blocks: update {c['compiled_update_s']:.3f} s against {c['eager_update_s']:.3f} s "
                f"eager ({c['speedup']:.2f}x), MFU {mfu['mfu_compiled'] or 0:.3f}; first compiled update "
                f"{c['compiled_first_update_s']:.1f} s"
            )
    _write(args.out, info, results, complete=True)
    return 0


def _write(out: Path | None, info: dict, results: list, complete: bool) -> None:
    """The results so far; `complete` is False until every asked algorithm has run (a last entry with
    `partial: true` holds the stages its algorithm finished)."""
    if out:
        out.write_text(json.dumps({"facts": info, "results": results, "complete": complete}, indent=1))


def gc_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
