"""Tiny model on one GPU: where a `recipes/pretrain_tiny.yaml` step's time goes (data, Python, small kernels).

    python benchmarks/gpu/tiny_steps.py [--recipe recipes/pretrain_tiny.yaml] [--device auto|cuda|cpu]
        [--batch-size 64] [--workers 0 6 12] [--data-batches 40] [--steps 100] [--warmup 10]
        [--loop-steps 200] [--loop-workers N] [--profile-steps 5] [--max-seconds 60]
        [--only data step loop profile syncs] [--compare-compile [--wrappers python cpp]] [--compare-graphs]
        [--variants LABEL:KEY=VALUE,...] [--read-every N] [--out results.json]
        [--out-dir DIR] [--quick]

    python benchmarks/gpu/tiny_steps.py key=value ... --only step profile   # recipe overrides come first

    python benchmarks/gpu/tiny_steps.py --quick     # a CPU check of the script: batch 8, a few steps each

One process, the recipe's model (random init, as the run starts) in the local runtime, `key=value` overrides
applied after the script's own (which include `model.train_graphs=false`: eager is the baseline). The target is
20 steps/s at batch 64 (1280 samples/s). Six measurements:

1. data: batches/s of the training stream alone (`train_batches(recipe.data, ...)`: loader workers generate the shapes
   scenes, the training process receives them one by one and collates), for each `--workers` value; the first
   batch (worker start-up) is timed apart. Shows whether data generation can feed the target at all, and
   what receiving a batch costs the training process's CPU (time its Python thread cannot spend on steps).
2. step: `runtime.learner.step(batch, None, generator)` as the driver calls it, on one fixed pre-drawn batch,
   held on the device (`device batch`: no data loading, no copy) and as the loader hands it over (`host batch`:
   the step copies it to the device). `--warmup` steps excluded, CUDA synchronised around the timed region.
   `process CPU` is this process's CPU time over the wall time (all its threads: near 100 % with a GPU, the
   step is bound by the host). With `--compare-compile`, the device batch again with the learner's repeated blocks
   compiled (`model.train_compile`, same model, same process; the first compiled step, which compiles, timed apart),
   once per inductor wrapper in `--wrappers` (`model.train_compile_wrapper`). With `--compare-graphs`, the device
   batch with the encoders and SAM2's decoding replayed as CUDA graphs (`model.train_graphs`, same model, same
   process; the first step, which captures, timed apart), then eager once more (`device, again`), so that a drift
   of the machine shows; each labelled row is its own measurement.
3. loop: the driver's loop (`dualrl/train.py`: next batch, learner step reading its figures every `--read-every`
   steps as the driver does on the steps it logs, EMA sync to the teacher every `train.sync_every` steps) for
   `--loop-steps` steps with `--loop-workers` loader workers (default: the recipe's); `data wait` is the share of
   the wall time spent in `next(batches)`; GPU utilisation is sampled by NVML (`torch.cuda.utilization`, else
   `nvidia-smi -lms`) during the timed steps.
4. profile: `torch.profiler` (CPU + CUDA activities) over `--profile-steps` learner steps on the host batch:
   tables by self CPU time and self CUDA time (top 25), and per step: CUDA kernels and their launches, memory
   copies by direction, synchronising calls (cudaStreamSynchronize & co., aten::_local_scalar_dense from
   `.item()` / `bool(tensor)`, aten::nonzero), and the share of the step's wall time the GPU is busy (union of
   kernel and copy intervals). The profiler slows the host side; its step times are not the rates of 2./3.
5. pyprofile: cProfile over `--profile-steps` learner steps on the device batch: the Python functions that hold the
   host, by own and by cumulative time (appended to `profile_tables.txt`).
6. syncs: one learner step (host batch) under a dispatch mode that records, by the innermost dualrl/ (or
   rewards/) source line, every op that makes the host wait for the device: `.item()` / `bool(t)` / `int(t)`
   (aten::_local_scalar_dense), nonzero, boolean-mask indexing, masked_select, repeat_interleave by a tensor,
   copies between host and device (a blocking copy synchronises the stream), `torch.tensor(data, device=cuda)`,
   a device tensor indexed by a host index tensor (ATen copies the index over, blocking).
   On CUDA `torch.cuda.set_sync_debug_mode("warn")` also counts what the driver reports as synchronising, by
   the same lines (autograd's backward thread excepted). On a CPU the list shows the candidates: every tensor
   is a host tensor there, so host-only `.item()`s appear (the non-fused CPU AdamW's, one per parameter) and
   host-device copies cannot. Also counted: every op dispatched in the step, by dualrl line and by library file.

Files in `--out-dir` (default: $OUT if set, else a new temporary folder): `profile_tables.txt` (tables and
sync sites) and `trace.json.gz` (chrome://tracing or ui.perfetto.dev; dropped if over 15 MB), plus
`tiny_steps.json` unless `--out` names the results file elsewhere. The short table comes last.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, compiled_blocks, sync
from common import facts as machine_facts

from dualrl.algo.registry import objective_class
from dualrl.algo.rollout_data import Rollout
from dualrl.data.loader import train_batches
from dualrl.recipe import load_recipe
from dualrl.runtime import resolve_device, set_intra_op_threads, start_runtime
from dualrl.train import ROLLOUT_SEED, step_generator, step_seed

TARGET_STEPS_PER_S = 20.0
TRACE_LIMIT_BYTES = 15 * 2**20
DEFAULTS = {
    "device": "auto",
    "batch_size": 64,
    "workers": [0, 6, 12],
    "data_batches": 40,
    "steps": 100,
    "warmup": 10,
    "loop_steps": 200,
    "profile_steps": 5,
}
QUICK = {
    "device": "cpu",
    "batch_size": 8,
    "workers": [0],
    "data_batches": 3,
    "steps": 5,
    "warmup": 1,
    "loop_steps": 5,
    "profile_steps": 2,
}
SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
)  # runtime/driver API names, a `_v<n>` suffix dropped
ATEN_SYNCS = (
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "aten::is_nonzero",
    "aten::masked_select",
    "aten::_to_copy",
    "aten::copy_",
)


def cuda() -> bool:
    return torch.cuda.is_available()


def make_recipe(args, workers: int | None = None):
    overrides = [
        f"output_dir={args.tmp / 'run'}",
        f"train.device={args.device}",
        "wandb.mode=disabled",
        f"data.batch_size={args.batch_size}",
        "model.train_graphs=false",  # eager is the baseline (--compare-graphs adds the graphs); an override may set it
    ]
    if workers is not None:
        overrides.append(f"data.num_workers={workers}")
    return load_recipe(args.recipe, [*overrides, *args.overrides])


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ 1. data
def measure_data(args) -> list[dict]:
    rows = []
    for workers in args.workers:
        recipe = make_recipe(args, workers)
        t0 = time.perf_counter()
        batches = train_batches(recipe.data, recipe.model.sam.image_size)
        next(batches)
        first_s = time.perf_counter() - t0
        n, t1, cpu1 = 0, time.perf_counter(), time.process_time()
        while n < args.data_batches and time.perf_counter() - t1 < args.max_seconds:
            next(batches)
            n += 1
        wall, main_cpu = time.perf_counter() - t1, time.process_time() - cpu1
        batches.close()
        del batches
        rate = n / wall if n else 0.0
        rows.append(
            {
                "workers": workers,
                "batches": n,
                "first_batch_s": first_s,
                "batches_per_s": rate,
                "samples_per_s": rate * recipe.data.batch_size,
                "main_cpu_ms_per_batch": 1000 * main_cpu / max(n, 1),
            }
        )
        print(
            f"data: {workers} workers: {rate:.2f} batches/s ({rate * recipe.data.batch_size:.0f} samples/s) over "
            f"{n} batches; first batch {first_s:.2f} s; training process CPU "
            f"{rows[-1]['main_cpu_ms_per_batch']:.1f} ms per batch",
            flush=True,
        )
    return rows


# ------------------------------------------------------------------------------------------ 2. step
def fixed_rollout(runtime, recipe, plan, batch):
    """The captions of one step, drawn once (objectives with a rollout only; pretrain has none)."""
    if plan is None:
        return None
    captions = runtime.rollout.describe(batch, plan, ROLLOUT_SEED + step_seed(recipe.train.seed, 1))
    scored = runtime.reward.score(batch, captions, plan.group_size)
    return Rollout(captions, plan.group_size, scored.total)


def measure_step(args, runtime, recipe, batch, rollout, label: str) -> dict:
    learner, seed = runtime.learner, recipe.train.seed
    for i in range(args.warmup):
        learner.step(batch, rollout, step_generator(seed, i + 1))
    sync()
    times, t0, cpu0 = [], time.perf_counter(), time.process_time()
    for i in range(args.steps):
        t = time.perf_counter()
        read = (i + 1) % args.read_every == 0 or i + 1 == args.steps  # as the driver reads on the steps it logs
        learner.step(batch, rollout, step_generator(seed, args.warmup + i + 1), read=read)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t0 > args.max_seconds:
            break
    sync()
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    out = {
        "batch": label,
        "steps": len(times),
        "steps_per_s": len(times) / wall,
        "median_step_ms": 1000 * statistics.median(times),
        "cpu_busy": cpu_s / wall,
    }
    print(
        f"step ({label} batch): {out['steps_per_s']:.2f} steps/s, median {out['median_step_ms']:.1f} ms, "
        f"process CPU {100 * out['cpu_busy']:.0f} % of wall",
        flush=True,
    )
    return out


def first_step(runtime, recipe, batch, rollout) -> float:
    """Seconds of one learner step (step 1), synchronised on both sides: what compiling or capturing costs."""
    sync()
    t = time.perf_counter()
    runtime.learner.step(batch, rollout, step_generator(recipe.train.seed, 1))
    sync()
    return time.perf_counter() - t


def measure_compiled_step(args, runtime, recipe, batch, rollout, wrapper: str) -> dict:
    """The device-batch step with the learner's blocks compiled, called by inductor's `wrapper` (label
    `compiled-<wrapper>`), after the eager measurements."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with compiled_blocks(runtime.learner, wrapper):
        first_s = first_step(runtime, recipe, batch, rollout)
        out = measure_step(args, runtime, recipe, batch, rollout, f"compiled-{wrapper}")
    out.update(first_step_s=first_s, compiled_graphs=counters["stats"]["unique_graphs"] - graphs)
    print(
        f"compiled ({wrapper} wrapper): first step {first_s:.1f} s, {out['compiled_graphs']} graphs compiled",
        flush=True,
    )
    return out


def measure_graphed_step(args, runtime, recipe, batch, rollout) -> dict:
    """The device-batch step with the learner's fixed-shape parts as CUDA graphs (label `graphs`)."""
    from dualrl.model.train_graphs import TrainGraphs

    learner = runtime.learner
    learner.graphs = TrainGraphs(learner.model)
    try:
        first_s = first_step(runtime, recipe, batch, rollout)
        out = measure_step(args, runtime, recipe, batch, rollout, "graphs")
        out.update(first_step_s=first_s, captures=learner.graphs.captures, eager_calls=learner.graphs.eager_calls)
    finally:
        learner.graphs = None
    print(f"graphs: first step {first_s:.2f} s, {out['captures']} parts captured", flush=True)
    return out


def measure_variant(args, variant: str, device_batch: dict) -> dict:
    """The device-batch step of a runtime built again with the variant's overrides (`LABEL:key=value,...`),
    after the base measurements, in the same process; torch's TF32 switches are put back afterwards, so that a
    `model.precision=tf32` variant does not leak into what is measured next."""
    label, _, spec = variant.partition(":")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    args_v = argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *filter(None, spec.split(","))]})
    recipe = make_recipe(args_v, args.loop_workers)
    runtime = start_runtime(recipe)
    try:
        runtime.sync()
        first_s = first_step(runtime, recipe, device_batch, None)
        out = measure_step(args, runtime, recipe, device_batch, None, f"variant {label}")
        out.update(variant=variant, first_step_s=first_s)
    finally:
        runtime.shutdown()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return out


def python_profile(args, runtime, recipe, batch, rollout) -> dict:
    """cProfile over `--profile-steps` learner steps on the device batch (after `--warmup` untimed ones): the
    Python functions that hold the host, by own time and by cumulative time (torch's builtins included)."""
    import cProfile
    import io
    import pstats

    learner, seed = runtime.learner, recipe.train.seed
    for i in range(args.warmup):
        learner.step(batch, rollout, step_generator(seed, i + 1))
    sync()
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    for i in range(args.profile_steps):
        learner.step(batch, rollout, step_generator(seed, args.warmup + i + 1))
    sync()
    profiler.disable()
    wall = time.perf_counter() - t
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumtime").print_stats(40)
    print(f"python profile: {args.profile_steps} steps, {1000 * wall / args.profile_steps:.1f} ms a step", flush=True)
    return {"steps": args.profile_steps, "step_ms": 1000 * wall / args.profile_steps, "text": text.getvalue()}


# ------------------------------------------------------------------------------------------ 3. loop
class GpuUtilisation:
    """Samples the GPU's NVML utilisation (% of time a kernel ran) in a thread: torch.cuda.utilization (needs
    pynvml), else a `nvidia-smi -lms` subprocess. `samples` stays empty where neither works (CPU)."""

    def __init__(self, period_s: float = 0.1):
        self.period_s, self.samples, self.source = period_s, [], None
        self._stop = threading.Event()
        self._thread = self._proc = None

    def start(self) -> GpuUtilisation:
        if not cuda():
            return self
        try:
            torch.cuda.utilization()
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll, daemon=True)
        except Exception:
            if shutil.which("nvidia-smi") is None:
                return self
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    visible,
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(int(1000 * self.period_s)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(float(torch.cuda.utilization()))

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def stop(self) -> dict:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_source": self.source, "gpu_util_samples": 0}
        return {
            "gpu_util_mean": statistics.fmean(self.samples),
            "gpu_util_median": statistics.median(self.samples),
            "gpu_util_source": self.source,
            "gpu_util_samples": len(self.samples),
        }


class CpuSplit:
    """CPU time between `start()` and `stop()`: this process's threads grouped by name (the main thread, torch's intra-
    op pool and others that keep the process's name, the ones that name themselves (CUDA's, ...)) and the whole
    machine's busy cores, from /proc (empty where there is none), so that a loop's host time can be put on the
    threads that spent it."""

    def start(self) -> CpuSplit:
        self.threads, self.machine, self.t0 = self._threads(), self._machine(), time.perf_counter()
        return self

    @staticmethod
    def _threads() -> dict[int, tuple[str, float]]:
        out, tick = {}, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        # Python threads by their own names (the OS name of a Python thread is the process's before 3.14)
        python_names = {t.native_id: f"py:{t.name}" for t in threading.enumerate() if t.native_id is not None}
        for task in Path("/proc/self/task").glob("*") if Path("/proc/self/task").is_dir() else []:
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended between the listing and the read
                continue
            tid = int(task.name)  # other threads inherit the process's name unless they set their own
            name = "main" if tid == os.getpid() else python_names.get(tid, name)
            out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
        return out

    @staticmethod
    def _machine() -> tuple[float, float] | None:
        try:
            cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        values = [float(v) for v in cpu[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        return sum(values) - idle, sum(values)

    def stop(self) -> dict:
        wall, before, after = time.perf_counter() - self.t0, self.threads, self._threads()
        by_name: Counter = Counter()
        for tid, (name, seconds) in after.items():
            by_name[name] += seconds - before.get(tid, (name, 0.0))[1]
        out = {"threads_cores": {k: round(v / wall, 3) for k, v in by_name.most_common() if v > 0}}
        start, end = self.machine, self._machine()
        if start is not None and end is not None and end[1] > start[1]:
            out["machine_busy_cores"] = (os.cpu_count() or 1) * (end[0] - start[0]) / (end[1] - start[1])
        return out


def measure_loop(args, runtime, recipe, plan) -> dict:
    """The loop of `dualrl.train.run` without logging, eval and checkpoints (`--unpinned`: batches in pageable memory,
    as before the driver pinned them for a GPU learner)."""
    pin = not args.unpinned and resolve_device(recipe.train.device) == "cuda"
    batches = train_batches(recipe.data, recipe.model.sam.image_size, pin=pin)
    seed, sampler = recipe.train.seed, None
    waits, learns, steps, n = [], [], [], 0
    t_start = time.perf_counter()
    for step in range(1, args.warmup + args.loop_steps + 1):
        if step == args.warmup + 1:
            sync()
            t0, cpu0, sampler = time.perf_counter(), time.process_time(), GpuUtilisation().start()
            split = CpuSplit().start()
        t = time.perf_counter()
        batch = next(batches)
        metrics = batches.metrics()
        t_data = time.perf_counter()
        rollout = None
        if plan is not None:
            captions = runtime.rollout.describe(batch, plan, ROLLOUT_SEED + step_seed(seed, step))
            scored = runtime.reward.score(batch, captions, plan.group_size)
            rollout = Rollout(captions, plan.group_size, scored.total)
        t_learn = time.perf_counter()
        read = step % args.read_every == 0  # as the driver reads on the steps it logs
        metrics.update(runtime.learner.step(batch, rollout, step_generator(seed, step), read=read))
        t_learned = time.perf_counter()
        if plan is not None and step % recipe.train.sync_every == 0:  # as the driver: no captions, no teacher to sync
            metrics.update(runtime.sync())
        if sampler is not None:
            waits.append(t_data - t)
            learns.append(t_learned - t_learn)
            steps.append(time.perf_counter() - t)
            n += 1
            if time.perf_counter() - t0 > args.max_seconds:
                break
    sync()
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    util, cpu = sampler.stop(), split.stop()
    batches.close()
    out = {
        "workers": recipe.data.num_workers,
        "steps": n,
        "steps_per_s": n / wall,
        "samples_per_s": n * recipe.data.batch_size / wall,
        "data_wait": sum(waits) / wall,
        "median_data_wait_ms": 1000 * statistics.median(waits),
        "median_step_ms": 1000 * statistics.median(steps),
        "median_learner_step_ms": 1000 * statistics.median(learns),
        "cpu_busy": cpu_s / wall,
        "torch_threads": torch.get_num_threads(),
        "chunk": recipe.data.chunk,
        "read_every": args.read_every,
        **cpu,
        "warmup_s": t0 - t_start,
        **util,
    }
    gpu = f"{out['gpu_util_mean']:.0f} %" if out["gpu_util_mean"] is not None else "n/a"
    print(
        f"loop ({out['workers']} workers): {out['steps_per_s']:.2f} steps/s ({out['samples_per_s']:.0f} samples/s), "
        f"data wait {100 * out['data_wait']:.0f} % of wall, process CPU {100 * out['cpu_busy']:.0f} %, "
        f"GPU utilisation {gpu}; median learner step {out['median_learner_step_ms']:.1f} ms; cores busy by thread "
        f"{out['threads_cores']}, machine {out.get('machine_busy_cores', float('nan')):.1f} cores",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------------------- 4. profile
@contextmanager
def labelled_parts(learner):
    """record_function labels around the objective (forward) and the EMA update, for the trace."""
    from torch.profiler import record_function

    objective, ema_update = learner.objective, getattr(learner.ema, "update", None)

    class Objective:
        def __getattr__(_, name):
            return getattr(objective, name)

        def __call__(_, *a, **k):
            with record_function("tiny_steps/forward"):
                return objective(*a, **k)

    def update(*a, **k):
        with record_function("tiny_steps/ema_update"):
            return ema_update(*a, **k)

    learner.objective = Objective()
    if ema_update is not None:
        learner.ema.update = update
    try:
        yield
    finally:
        learner.objective = objective
        if ema_update is not None:
            del learner.ema.update


def _is_device(evt) -> bool:
    return str(getattr(evt, "device_type", "")).endswith(("CUDA", "PrivateUse1"))


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_steps(args, runtime, recipe, batch, rollout, out_dir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    learner, seed = runtime.learner, recipe.train.seed
    for i in range(2):  # warm (the step phase may have been skipped)
        learner.step(batch, rollout, step_generator(seed, i + 1))
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    k = args.profile_steps
    with labelled_parts(learner), profile(activities=activities) as prof:
        for i in range(k):
            with record_function("tiny_steps/step"):
                learner.step(batch, rollout, step_generator(seed, 100 + i))
                sync()
    events = prof.events()
    ranges: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    device_intervals, kernel_us = [], 0.0
    for evt in events:
        name = evt.name
        if _is_device(evt):
            device_intervals.append((evt.time_range.start, evt.time_range.end))
            if name.startswith("Memcpy"):
                key = "memcpy " + name.split()[1] if len(name.split()) > 1 else "memcpy"
            elif name.startswith("Memset"):
                key = "memset"
            else:
                key, kernel_us = "kernels", kernel_us + evt.time_range.elapsed_us()
            counts[key] = counts.get(key, 0) + 1
            continue
        if name.startswith("tiny_steps/") or name.startswith("Optimizer.step#"):
            label = "optimizer" if name.startswith("Optimizer.step#") else name.split("/", 1)[1]
            ranges.setdefault(label, []).append(evt.time_range.elapsed_us())
        api = re.sub(r"_v\d+$", "", name)
        if api.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch")):
            counts["launches"] = counts.get("launches", 0) + 1
        if api in SYNC_CALLS or name in ATEN_SYNCS:
            counts[api] = counts.get(api, 0) + 1
        if name.startswith("aten::"):
            counts["aten ops (all levels)"] = counts.get("aten ops (all levels)", 0) + 1
    step_us = sum(ranges.get("step", [0.0]))
    per_step = {name: c / k for name, c in sorted(counts.items())}
    parts_ms = {name: sum(v) / k / 1000 for name, v in sorted(ranges.items())}
    summary = {
        "steps": k,
        "step_ms": step_us / k / 1000,
        "parts_ms": parts_ms,
        "per_step": per_step,
        "gpu_busy": _union_us(device_intervals) / step_us if device_intervals and step_us else None,
        "kernel_ms_per_step": kernel_us / k / 1000 if device_intervals else None,
    }
    averages = prof.key_averages()
    cuda_key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    tables = [("self CPU time", "self_cpu_time_total")] + ([("self CUDA time", cuda_key)] if cuda() else [])
    text = [f"torch.profiler over {k} learner steps (host batch), {torch.cuda.get_device_name(0) if cuda() else 'cpu'}"]
    for title, key in tables:
        text.append(f"\n== sorted by {title} ==\n{averages.table(sort_by=key, row_limit=25, max_name_column_width=70)}")
    text.append("\n== per step ==\n" + json.dumps({k_: v for k_, v in summary.items() if k_ != "steps"}, indent=1))
    text = "\n".join(text)
    (out_dir / "profile_tables.txt").write_text(text)
    print(text, flush=True)
    trace = out_dir / "trace.json.gz"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
    except Exception as err:  # the tables and counts above are the result; the trace is a convenience
        summary["trace"] = f"not written: {err!r}"
        trace.unlink(missing_ok=True)
    else:
        summary["trace"] = str(trace)
    if trace.exists() and trace.stat().st_size > TRACE_LIMIT_BYTES:
        summary["trace"] = f"dropped: {trace.stat().st_size / 2**20:.1f} MB gzipped (use fewer --profile-steps)"
        trace.unlink()
    return summary


# ----------------------------------------------------------------------------------------- 5. syncs
_HERE = str(Path(__file__).resolve())
_REPO_DIRS = (str(ROOT / "dualrl") + os.sep, str(ROOT / "rewards") + os.sep)
_MASK_DTYPES = (torch.bool, torch.uint8)


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _short(filename: str) -> str:
    for marker in (str(ROOT) + os.sep, "site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _where(frame) -> tuple[str, str]:
    """(innermost repo line, innermost file:line outside torch and this script) of the Python stack."""
    site = via = ""
    while frame is not None:
        name = frame.f_code.co_filename
        if not via and name != _HERE and f"{os.sep}torch{os.sep}" not in name and "warnings" not in name:
            via = f"{_short(name)}:{frame.f_lineno}"
        if name.startswith(_REPO_DIRS):
            site = f"{_short(name)}:{frame.f_lineno}"
            break
        frame = frame.f_back
    return site or "(outside dualrl)", via


class SyncSites(TorchDispatchMode):
    """Counts the ops that make the host wait for the device, by source line (see 5. in the docstring).
    `emulate` (a CPU run): flag item/nonzero/masks on host tensors too, as they would sync on a GPU."""

    def __init__(self, emulate: bool):
        super().__init__()
        self.emulate, self.sites = emulate, Counter()
        self.ops: Counter = Counter()  # every op, by repo line
        self.libs: Counter = Counter()  # every op, by the innermost file outside torch (a library's module)

    def _why(self, name: str, args, kwargs) -> str | None:
        first = args[0] if args else None
        flag = self.emulate or _on_device(first)
        if name == "_local_scalar_dense":
            return "item / bool / int of a tensor" if flag else None
        if name in ("nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"):
            return name if flag else None
        if name == "repeat_interleave" and isinstance(first, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave by a tensor" if flag else None
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = [i for i in (args[1] if len(args) > 1 else kwargs.get("indices", ())) or () if i is not None]
            if any(i.dtype in _MASK_DTYPES for i in indices):
                return "boolean-mask index" if flag else None
            if _on_device(first) and any(not _on_device(i) for i in indices):
                return "host index into a device tensor"  # ATen copies the index over, blocking
        if name == "_to_copy" and isinstance(first, torch.Tensor) and kwargs.get("device") is not None:
            target = torch.device(kwargs["device"]).type
            if target != first.device.type:
                return f"copy {first.device.type} -> {target}"
        if (
            name == "copy_"
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and args[0].device.type != args[1].device.type
        ):
            return f"copy_ {args[1].device.type} -> {args[0].device.type}"
        if name == "lift_fresh" and _on_device(first):
            return "torch.tensor(host data, device=...)"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site, via = _where(sys._getframe(1))
        self.ops[site] += 1
        self.libs[via.rsplit(":", 1)[0]] += 1
        why = self._why(func.overloadpacket.__name__, args, kwargs)
        if why is not None:
            self.sites[(site, via, why)] += 1
        return func(*args, **kwargs)


def sync_sites(args, runtime, recipe, batch, rollout) -> dict:
    """One learner step with `SyncSites` (and CUDA's sync debug mode): sites sorted by count."""
    learner, emulate = runtime.learner, not cuda()
    learner.step(batch, rollout, step_generator(recipe.train.seed, 200))  # warm
    sync()
    reported: Counter = Counter()
    stacks: dict[str, list[str]] = {}  # the first Python stack of each site CUDA reports, library frames included

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            site = _where(sys._getframe(1))[0]
            reported[site] += 1
            if site not in stacks:
                frames = traceback.extract_stack(sys._getframe(1))
                stacks[site] = [
                    f"{_short(f.filename)}:{f.lineno} {f.name}"
                    for f in frames
                    if f.filename != _HERE and "warnings" not in f.filename and "torch/nn/modules" not in f.filename
                ][-12:]

    mode = SyncSites(emulate)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if cuda():
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with mode:
                learner.step(batch, rollout, step_generator(recipe.train.seed, 201))
            sync()
        finally:
            if cuda():
                torch.cuda.set_sync_debug_mode("default")
    rows = [
        {
            "site": site,
            "via": via if via != site else "",
            "op": why,
            "count": n,
            "cuda_reported": reported.get(site, 0) if cuda() else None,
        }
        for (site, via, why), n in mode.sites.most_common()
    ]
    listed = {r["site"] for r in rows}
    rows += [
        {"site": site, "via": "", "op": "(reported by CUDA only)", "count": 0, "cuda_reported": n}
        for site, n in reported.most_common()
        if site not in listed
    ]
    out = {
        "emulated_on_cpu": emulate,
        "sites": rows,
        "total": sum(mode.sites.values()),
        "cuda_reported_total": sum(reported.values()) if cuda() else None,
        "ops_total": sum(mode.ops.values()),
        "ops_by_site": dict(mode.ops.most_common(20)),
        "ops_by_file": dict(mode.libs.most_common(15)),
    }
    head = (
        "sync sites of one learner step"
        + (" (CPU: candidates, host tensors included)" if emulate else "")
        + f": {out['total']} flagged ops"
        + (f", {out['cuda_reported_total']} reported by CUDA" if cuda() else "")
    )
    lines = [head, f"{'count':>5s} {'cuda':>5s}  {'site':42s} {'op':34s} via"]
    for r in rows:
        cuda_n = "" if r["cuda_reported"] is None else str(r["cuda_reported"])
        lines.append(f"{r['count']:5d} {cuda_n:>5s}  {r['site']:42s} {r['op']:34s} {r['via']}")
    lines.append(
        f"\naten ops dispatched in the step: {out['ops_total']} (backward included where autograd runs them "
        "in this thread); top sites (innermost dualrl line) and files (innermost outside torch):"
    )
    lines += [f"{n:7d}  {site}" for site, n in out["ops_by_site"].items()]
    lines += [""] + [f"{n:7d}  {name}" for name, n in out["ops_by_file"].items()]
    out["stacks"] = stacks
    for site, frames in stacks.items():
        lines += [f"\nstack of the first sync CUDA reported at {site}:"] + [f"    {f}" for f in frames]
    out["text"] = "\n".join(lines)
    print(out["text"], flush=True)
    return out


# ------------------------------------------------------------------------------------------- main
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/pretrain_tiny.yaml"))
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, nargs="+", help="loader workers of the data phase, each timed")
    parser.add_argument("--data-batches", type=int, help="batches timed per workers value")
    parser.add_argument("--steps", type=int, help="timed learner steps per batch placement")
    parser.add_argument("--warmup", type=int, help="untimed steps before the step and loop phases")
    parser.add_argument("--loop-steps", type=int)
    parser.add_argument("--loop-workers", type=int, default=None, help="default: the recipe's data.num_workers")
    parser.add_argument("--profile-steps", type=int)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap on each timed phase")
    phases = ("data", "step", "loop", "profile", "pyprofile", "syncs")
    parser.add_argument("--only", nargs="+", choices=phases, default=list(phases))
    parser.add_argument(
        "--compare-compile",
        action="store_true",
        help="step phase: time the device batch again with the learner's blocks compiled (model.train_compile)",
    )
    parser.add_argument(
        "--compare-graphs",
        action="store_true",
        help="step phase: time the device batch again with the encoders and SAM2 decoding as CUDA graphs "
        "(model.train_graphs; CUDA only), then eager again",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="step phase: the device batch again on a runtime built with these overrides added (pretrain "
        "recipes: no rollout), one variant after the other, then the base runtime again; e.g. "
        "tf32:model.precision=tf32",
    )
    parser.add_argument(
        "--read-every",
        type=int,
        default=None,
        help="step and loop phases: the learner reads its figures back every this many steps, as the driver does on "
        "the steps it logs (default: the recipe's train.log_every; 1: every step, as before the figures waited on "
        "the device)",
    )
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="loop phase: batches in pageable host memory (the driver pins them for a GPU learner in its process)",
    )
    parser.add_argument(
        "--wrappers",
        nargs="+",
        choices=("python", "cpp"),
        default=["python"],
        help="--compare-compile: inductor's wrappers to time, each in turn (model.train_compile_wrapper)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller defaults, to check the script on a CPU: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: OUT_DIR/tiny_steps.json)")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value, applied last")
    args = parser.parse_args()
    for key, value in DEFAULTS.items():  # options left out take the quick or the full default
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    return args


def main() -> int:
    args = parse_args()
    args.device = resolve_device(args.device)
    args.out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="tiny_steps_"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    facts = {
        **machine_facts(),  # versions, the card, the kernel release and the cores
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if cuda() else None,
        "recipe": args.recipe,
        "batch_size": args.batch_size,
        "overrides": args.overrides,
        "out_dir": str(args.out_dir),
    }
    print(json.dumps(facts), flush=True)
    results: dict = {"facts": facts}

    def phase(name: str, fn, *a):
        """One measurement; a failure is recorded and printed, and the other phases still run."""
        if name not in args.only:
            return
        try:
            results[name] = fn(*a)
        except Exception:
            results.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"{name} failed:\n{results['errors'][name]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        phase("data", measure_data, args)
        if {"step", "loop", "profile", "pyprofile", "syncs"} & set(args.only):
            recipe = make_recipe(args, args.loop_workers)
            set_intra_op_threads(recipe.train.threads, args.device)  # as the driver does
            args.read_every = args.read_every or recipe.train.log_every
            t0 = time.perf_counter()
            runtime = start_runtime(recipe)
            runtime.sync()
            sync()
            model = runtime.learner.model
            facts.update(
                build_s=time.perf_counter() - t0,
                torch_threads=torch.get_num_threads(),
                params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                trainable_m=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
                trainable_tensors=sum(1 for p in model.parameters() if p.requires_grad),
            )
            plan = objective_class(recipe.algo).plan(recipe)
            draw_recipe = make_recipe(args, 0)
            draw = train_batches(draw_recipe.data, draw_recipe.model.sam.image_size)
            host_batch = next(draw)
            draw.close()
            device_batch = to_device(host_batch, args.device)
            rollout = fixed_rollout(runtime, recipe, plan, host_batch)
            phase(
                "step",
                lambda: [
                    measure_step(args, runtime, recipe, device_batch, rollout, "device"),
                    measure_step(args, runtime, recipe, host_batch, rollout, "host"),
                    *(
                        [
                            measure_compiled_step(args, runtime, recipe, device_batch, rollout, wrapper)
                            for wrapper in args.wrappers
                        ]
                        if args.compare_compile
                        else []
                    ),
                    *(
                        [
                            measure_graphed_step(args, runtime, recipe, device_batch, rollout),
                            measure_step(args, runtime, recipe, device_batch, rollout, "device, again"),
                        ]
                        if args.compare_graphs
                        else []
                    ),
                    *[measure_variant(args, v, device_batch) for v in args.variants],
                    *(
                        [measure_step(args, runtime, recipe, device_batch, rollout, "device, after variants")]
                        if args.variants
                        else []
                    ),
                ],
            )
            phase("profile", profile_steps, args, runtime, recipe, host_batch, rollout, args.out_dir)
            phase("pyprofile", python_profile, args, runtime, recipe, device_batch, rollout)
            phase("syncs", sync_sites, args, runtime, recipe, host_batch, rollout)
            for name in ("pyprofile", "syncs"):
                if name in results:
                    with (args.out_dir / "profile_tables.txt").open("a") as f:
                        f.write("\n\n" + results[name]["text"] + "\n")
            phase("loop", measure_loop, args, runtime, recipe, plan)
            runtime.shutdown()
    if cuda():
        facts["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out = args.out or args.out_dir / "tiny_steps.json"
    out.write_text(json.dumps(results, indent=1))
    print_table(results, args.batch_size)
    print(
        f"results: {out}; profile files in {args.out_dir}"
        + (f"; FAILED: {sorted(results['errors'])}" if "errors" in results else "")
    )
    return 1 if "errors" in results else 0


def print_table(results: dict, batch_size: int) -> None:
    target = TARGET_STEPS_PER_S
    print(
        f"\n{'phase':22s} {'steps (batches)/s':>18s} {'samples/s':>10s}  notes "
        f"(target {target:.0f} steps/s = {target * batch_size:.0f} samples/s at batch {batch_size})"
    )
    for r in results.get("data", []):
        print(
            f"{'data, ' + str(r['workers']) + ' workers':22s} {r['batches_per_s']:18.2f} {r['samples_per_s']:10.0f}  "
            f"first batch {r['first_batch_s']:.1f} s, training process CPU {r['main_cpu_ms_per_batch']:.1f} ms/batch"
        )
    for r in results.get("step", []):
        print(
            f"{'step, ' + r['batch']:22s} {r['steps_per_s']:18.2f} {r['steps_per_s'] * batch_size:10.0f}  "
            f"median {r['median_step_ms']:.1f} ms, process CPU {100 * r['cpu_busy']:.0f} %"
        )
    if "loop" in results:
        r = results["loop"]
        gpu = f"{r['gpu_util_mean']:.0f} % ({r['gpu_util_source']})" if r["gpu_util_mean"] is not None else "n/a"
        print(
            f"{'loop, ' + str(r['workers']) + ' workers':22s} {r['steps_per_s']:18.2f} {r['samples_per_s']:10.0f}  "
            f"data wait {100 * r['data_wait']:.0f} %, process CPU {100 * r['cpu_busy']:.0f} %, GPU util {gpu}"
        )
    if "profile" in results:
        r, c = results["profile"], results["profile"]["per_step"]
        busy = f"{100 * r['gpu_busy']:.0f} %" if r["gpu_busy"] is not None else "n/a"
        syncs = sum(c.get(n, 0) for n in SYNC_CALLS)
        print(
            f"{'profile (per step)':22s} {1000 / r['step_ms']:18.2f} {'':10s}  GPU busy {busy}; kernels "
            f"{c.get('kernels', 0):.0f}, launches {c.get('launches', 0):.0f}, sync calls {syncs:.0f}, "
            f"_local_scalar_dense {c.get('aten::_local_scalar_dense', 0):.0f}, nonzero "
            f"{c.get('aten::nonzero', 0):.0f}, memcpy HtoD {c.get('memcpy HtoD', 0):.0f} / DtoH "
            f"{c.get('memcpy DtoH', 0):.0f}, aten ops {c.get('aten ops (all levels)', 0):.0f}"
        )
        print(f"{'':22s} {'':18s} {'':10s}  parts (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items()))
    if "syncs" in results:
        r = results["syncs"]
        top = ", ".join(f"{x['site']} {x['op']} x{x['count']}" for x in r["sites"][:4])
        cuda_n = "" if r["cuda_reported_total"] is None else f", {r['cuda_reported_total']} reported by CUDA"
        print(
            f"{'syncs (one step)':22s} {'':18s} {'':10s}  {r['total']} flagged ops{cuda_n}"
            f"{' (CPU: candidates)' if r['emulated_on_cpu'] else ''}; {r['ops_total']} aten ops; top: {top}"
        )
    for name in results.get("errors", {}):
        print(f"{name:22s} FAILED (traceback above and in the results file)")


if __name__ == "__main__":
    sys.exit(main())
