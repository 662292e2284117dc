"""Caption rollout on one GPU: dualrl's decoding engine against transformers' `generate` and this shape's limit.

    python benchmarks/gpu/rollout.py [--recipe recipes/sa2va/random_init/sa2va_4b_grpo.yaml] [--regions 16]
        [--generations 4] [--steps 8] [--paths engine engine_eager generate_dynamic generate_static] [--tiny]
        [--out rollout.json]

One captioner (the recipe's model, random init on the device: speed does not depend on weight values; bf16; LoRA
as the recipe sets it) captions `--regions` regions x `--generations` samples a step, 64 tokens each (random
weights rarely end a caption early). Every step draws new scenes and regions, so prompt lengths change at every
step, as they do in training; every path sees the same batches. Per step: the vision encoding of the step's
images (`encode_s`) and the captions (`caption_s`: prompt assembly, prefill, decode), timed with CUDA
synchronisation; the first step (warm-up: graph capture, compilation) is reported apart.

Paths: `engine` (model.generation=engine, CUDA graphs), `engine_eager` (the same without graphs),
`engine_compiled` (model.decode_compile: the step's decoder layers compiled by torch.compile, then captured),
`engine_fused` (the same with model.decode_fuse_projections: q/k/v and gate/up as one product each),
`generate_dynamic` and `generate_static` (model.generation=generate with either cache: every sample its own
prompt). `generate_static` recompiles for each new prompt shape (tens of seconds each): it runs
`--static-steps` steps on one repeated batch, its best case.

The limit: one prefill per region (its FLOPs at the measured bf16 matrix rate) plus, per token step, the
language model's weights and the KV cache read once at the measured copy bandwidth. `captions_per_s` is the
steady rate of the recipe's own engine path, named in `captions_path` (median step after the warm-up, encoding
included; `caption_only_per_s` without it); `fraction_of_limit` compares the caption time with the limit.
Before timing, greedy captions of the engine (graphs and eager) are compared with `generate`'s on one batch (`check`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_PATHS, ROOT, TINY_MODEL, build_on_device, ceilings, facts, median_ms, sync

from dualrl.data.batch import collate_regions
from dualrl.data.scenes import ShapesDataset
from dualrl.recipe import load_recipe
from dualrl.runtime import resolve_device

ENGINES = ("engine_eager", "engine", "engine_compiled", "engine_fused")


def shape_limit(model, prompt_lengths: list[int], group: int, max_new: int, rates: dict) -> dict:
    """Seconds this step's captions need at least: prefill FLOPs / matrix rate + decode bytes / bandwidth."""
    lm = model.lm
    config = model.vlm.config.text_config
    embed = model.vlm.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()}
    layer_params = [p for p in lm.parameters() if id(p) not in embed_ids]
    n_layer = sum(p.numel() for p in layer_params)
    head = model.vlm.lm_head.weight
    layers, hidden = config.num_hidden_layers, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_width = 2 * config.num_key_value_heads * head_dim  # keys and values per token per layer
    tokens = sum(prompt_lengths)
    # matmuls: 2 FLOPs per weight per token; causal attention: QK^T and AV over half the square
    prefill_flops = 2 * n_layer * tokens + 2 * layers * hidden * sum(n * n for n in prompt_lengths)
    prefill_flops += 2 * head.numel() * len(prompt_lengths)  # the first token's logits, once per region
    weight_bytes = sum(p.numel() * 2 for p in layer_params) + head.numel() * 2  # read in bf16
    kv_bytes_per_token = layers * kv_width * 2
    rows_context = sum(group * n for n in prompt_lengths)  # context tokens of all rows at the first decode step
    rows = group * len(prompt_lengths)
    decode_bytes = sum(weight_bytes + kv_bytes_per_token * (rows_context + rows * t) for t in range(max_new - 1))
    prefill_s = prefill_flops / rates["matmul_flops_per_s"]
    decode_s = decode_bytes / rates["copy_bytes_per_s"]
    return {
        "prefill_flops": prefill_flops,
        "decode_bytes": decode_bytes,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "limit_s": prefill_s + decode_s,
        "captions_per_s": rows / (prefill_s + decode_s),
    }


def batches(n_steps: int, regions: int, image_size: int, seed: int = 0) -> list[dict]:
    """New scenes and regions every step (region sizes, hence prompt lengths, differ from step to step)."""
    data = ShapesDataset("train", n_steps * regions, image_size=image_size, seed=seed, min_objects=1, max_objects=6)
    return [collate_regions([data[s * regions + i] for i in range(regions)]) for s in range(n_steps)]


@torch.no_grad()
def prompt_lengths(model, batch: dict) -> list[int]:
    with model.autocast():
        feats = model.encode_images(batch["images"], sam=False)
        tokens = model.project(feats)
        prompts = model.region_prompts(tokens, batch["masks"], torch.arange(len(batch["masks"])))
        return model.assemble(prompts).attention_mask.sum(dim=1).tolist()


def to_bf16(model) -> None:
    """What `model.precision: bf16` does at build: frozen weights stored in bf16, forward passes under autocast."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.spec = model.spec.model_copy(update={"precision": "bf16"})
    model.encodings.clear()


def set_path(model, path: str) -> None:
    """The model's generation settings for `path`; an engine path whose decoder settings differ from the last
    one's gets a decoder made afresh (its graphs and compilations were made for the other settings)."""
    generation = "engine" if path.startswith("engine") else "generate"
    cache = "static" if path == "generate_static" else "dynamic"
    update = {"generation": generation, "generation_cache": cache}
    if generation == "engine":
        update.update(
            decode_graphs=path != "engine_eager",
            decode_compile=path in ("engine_compiled", "engine_fused"),
            decode_fuse_projections=path == "engine_fused",
        )
    before = model.spec
    model.spec = model.spec.model_copy(update=update)
    if any(getattr(before, key) != value for key, value in update.items() if key.startswith("decode_")):
        model._decoder = None
        torch._dynamo.reset()  # a compiled path's warm-up pays its own compilations, not an earlier path's
        torch._dynamo.utils.counters.clear()


class _PhaseTimer:
    """Times the decoder call and the host-side caption extraction inside `describe` (CUDA-synchronised)."""

    def __init__(self, model):
        self.model = model
        self.times = {"decode_s": 0.0, "extract_s": 0.0}
        model._captions = self._wrap(model._captions, "extract_s")

    def _wrap(self, fn, key):
        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.times[key] += time.perf_counter() - t
            return out

        return timed

    def wrap_decoder(self) -> None:
        decoder = self.model.decoder
        if type(decoder).__name__ != "TimedDecoder":
            call = self._wrap(type(decoder).__call__, "decode_s")
            decoder.__class__ = type("TimedDecoder", (type(decoder),), {"__call__": call})

    def take(self) -> dict:
        out, self.times = self.times, {"decode_s": 0.0, "extract_s": 0.0}
        return out


def caption_step(model, batch: dict, group: int, max_new: int, seed: int, timer: _PhaseTimer | None = None) -> dict:
    sync()
    t0 = time.perf_counter()
    model.encodings.clear()  # every step encodes its images, as a rollout worker does
    with torch.no_grad(), model.autocast():
        feats = model.encode_images(batch["images"], sam=False)
    sync()
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.no_grad(), model.autocast():
        captions = model.describe(
            None, batch["masks"], feats=feats, group_size=group, sample=True, max_new_tokens=max_new
        )
    sync()
    t2 = time.perf_counter()
    generated = [len(i) + len(e) for i, e in zip(captions.ids, captions.ends)]
    phases = timer.take() if timer is not None else {}
    return {
        "encode_s": t1 - t0,
        "caption_s": t2 - t1,
        "rollout_s": t2 - t0,
        **phases,
        "captions": len(captions),
        "mean_tokens": sum(generated) / len(generated),
    }


def check(model, batch: dict, max_new: int) -> dict:
    """Greedy captions of each path on one batch, compared with generate's (dynamic cache). In float32 they
    must agree; in bf16, kernels that sum in another order flip argmaxes of random weights' flat logits."""
    out = {}
    for path in ("generate_dynamic", *ENGINES):
        set_path(model, path)
        with torch.no_grad(), model.autocast():
            out[path] = model.describe(batch["images"], batch["masks"], max_new_tokens=max_new)
    ref = out["generate_dynamic"]
    report = {}
    for path in ENGINES:
        same = [a.tolist() == b.tolist() for a, b in zip(out[path].ids, ref.ids)]
        diffs = [float((x - y).abs().max()) for x, y, s in zip(out[path].logprobs, ref.logprobs, same) if s and len(x)]
        # where captions part, how many tokens they share first (bf16 ties can flip an argmax)
        prefix = [
            next((k for k, (u, v) in enumerate(zip(a.tolist(), b.tolist())) if u != v), min(len(a), len(b)))
            for a, b in zip(out[path].ids, ref.ids)
        ]
        report[path] = {
            "identical_captions": sum(same),
            "captions": len(same),
            "max_logprob_diff_identical": max(diffs, default=0.0),
            "mean_shared_prefix_tokens": sum(prefix) / len(prefix),
        }
    return report


def run_path(model, path: str, steps: list[dict], group: int, max_new: int, rates: dict) -> dict:
    set_path(model, path)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    records = []
    timer = _PhaseTimer(model)
    if path.startswith("engine"):
        timer.wrap_decoder()
    for k, batch in enumerate(steps):
        lengths = prompt_lengths(model, batch)
        record = caption_step(model, batch, group, max_new, seed=k, timer=timer)
        record.update(
            prompt_min=min(lengths),
            prompt_max=max(lengths),
            limit_s=shape_limit(model, lengths, group, max_new, rates)["limit_s"],
        )
        records.append(record)
        print(
            f"{path} step {k + 1}: "
            + ", ".join(f"{key} {v:.3f}" if isinstance(v, float) else f"{key} {v}" for key, v in record.items()),
            flush=True,
        )
    timed = records[1:] or records
    median = {
        key: statistics.median(r[key] for r in timed) for key in ("encode_s", "caption_s", "rollout_s", "limit_s")
    }
    captions = records[0]["captions"]
    return {
        "warmup_step": records[0],
        "median": median,
        "steps": records,
        "captions_per_s": captions / median["rollout_s"],
        "caption_only_per_s": captions / median["caption_s"],
        "max_over_median": max(r["rollout_s"] for r in timed) / median["rollout_s"],
        "fraction_of_limit": median["limit_s"] / median["caption_s"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "graph_captures": getattr(model._decoder, "captures", 0) if path != "engine_eager" else 0,
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


def breakdown(model, batch: dict, group: int, max_new: int, out_dir: Path | None, path: str = "engine") -> dict:
    """Where a step of the engine goes: the captured decode step replayed alone, the token choice alone (sampling
    and greedy on logits of the step's shape), and a profile of one whole caption step (kernels by GPU time,
    operators by host time)."""
    from torch.profiler import ProfilerActivity, profile

    from dualrl.model.decode import Sampling, choose

    set_path(model, path)
    caption_step(model, batch, group, max_new, seed=0)
    state = next(reversed(model.decoder._states.values()))
    report = {}
    if state.graph is not None:
        report["replay_ms"] = median_ms(state.graph.replay)
    logits = torch.randn(state.rows, model.vlm.lm_head.weight.shape[0], device=state.kv.slot.device)
    report["choose_sample_ms"] = median_ms(lambda: choose(logits, Sampling(True, 1.0, model._top_k(), 1.0)))
    report["choose_greedy_ms"] = median_ms(lambda: choose(logits, Sampling()))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        caption_step(model, batch, group, max_new, seed=0)
    events = prof.key_averages()
    gpu_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    tables = {
        "by_gpu": events.table(sort_by=gpu_key, row_limit=25),
        "by_host": events.table(sort_by="self_cpu_time_total", row_limit=25),
    }
    for name, table in tables.items():
        print(f"--- profile of one engine step, {name}\n{table}", flush=True)
        if out_dir:
            (out_dir / f"{path}_profile_{name}.txt").write_text(table)
    print("breakdown", json.dumps(report), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/sa2va/random_init/sa2va_4b_grpo.yaml"))
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--static-steps", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=["engine", "engine_eager", "generate_dynamic"])
    parser.add_argument("--slow-steps", type=int, default=3, help="steps of the engine_eager and generate paths")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 128 px (checks the script on a CPU)")
    parser.add_argument("--profile", action="store_true", help="after the paths: where an engine step goes")
    parser.add_argument("--profile-path", default="engine", choices=ENGINES[1:])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    overrides = [
        "output_dir=/tmp/unused",
        *NO_PATHS,
        "train.device=auto",
        "data.shapes={}",
        *(TINY_MODEL if args.tiny else []),
    ]
    recipe = load_recipe(args.recipe, overrides)
    device = resolve_device(recipe.train.device)
    info = {
        **facts(),
        "recipe": args.recipe,
        "tiny": args.tiny,
        "regions": args.regions,
        "generations": args.generations,
        "max_new": args.max_new,
    }
    print(json.dumps(info), flush=True)
    rates = ceilings(device)
    print(json.dumps(rates), flush=True)
    t0 = time.perf_counter()
    bf16 = recipe.model.precision == "bf16"
    # built in float32 for the check, then stored as the recipe says (bf16: frozen weights in bf16)
    model = build_on_device(recipe.model.model_copy(update={"precision": "float32"}), device).eval()
    sync()
    info["build_s"] = time.perf_counter() - t0
    size = recipe.model.sam.image_size
    data = batches(args.steps + 1, args.regions, size)
    result = {"facts": info, "ceilings": rates, "paths": {}, "check": {}}
    for precision in ("float32", "bf16") if bf16 else ("float32",):
        if precision == "bf16":
            to_bf16(model)
        if args.skip_check:
            continue
        try:
            result["check"][precision] = check(model, data[-1], args.max_new)
        except Exception as err:
            traceback.print_exc()
            result.setdefault("failed", {})[f"check_{precision}"] = repr(err)
    print("check", json.dumps(result.get("check")), flush=True)
    for path in args.paths:
        if path == "generate_static":
            steps = [data[0]] * args.static_steps  # one batch repeated: static's best case (no new shapes)
        elif path in ("engine", "engine_compiled", "engine_fused"):
            steps = data[: args.steps]
        else:
            steps = data[: args.slow_steps]
        try:
            result["paths"][path] = run_path(model, path, steps, args.generations, args.max_new, rates)
        except Exception as err:  # one failing path must not lose the others' numbers; it is reported below
            traceback.print_exc()
            result.setdefault("failed", {})[path] = repr(err)
    if args.profile:
        out_dir = args.out.parent if args.out else None
        result["breakdown"] = breakdown(model, data[0], args.generations, args.max_new, out_dir, args.profile_path)
    lengths = prompt_lengths(model, data[0])
    result["limit_first_batch"] = shape_limit(model, lengths, args.generations, args.max_new, rates)
    # the top-level figures are the recipe's own path's (engine_fused for the Sa2VA recipes), else the plain engine's
    spec = recipe.model
    own = "engine" if not spec.decode_compile else "engine_fused" if spec.decode_fuse_projections else "engine_compiled"
    headline = next((p for p in (own, "engine") if p in result["paths"]), None)
    if headline:
        engine = result["paths"][headline]
        result["captions_path"] = headline
        result["captions_per_s"] = engine["captions_per_s"]
        result["fraction_of_limit"] = engine["fraction_of_limit"]
        for name in ("generate_dynamic", "generate_static", "engine_eager", "engine"):
            if name in result["paths"] and name != headline:
                result[f"speedup_over_{name}"] = (
                    result["paths"][name]["median"]["rollout_s"] / engine["median"]["rollout_s"]
                )
    print(f"\n{info['device']}: {args.regions} regions x {args.generations} captions of {args.max_new} tokens a step")
    print(
        f"{'path':18s} {'warm-up s':>9s} {'median s':>9s} {'captions/s':>10s} {'caption-only/s':>14s} "
        f"{'max/median':>10s} {'of limit':>8s}"
    )
    for name, r in result["paths"].items():
        print(
            f"{name:18s} {r['warmup_step']['rollout_s']:9.2f} {r['median']['rollout_s']:9.3f} "
            f"{r['captions_per_s']:10.1f} {r['caption_only_per_s']:14.1f} {r['max_over_median']:10.2f} "
            f"{r['fraction_of_limit']:8.2f}"
        )
    limit = result["limit_first_batch"]
    for name, err in result.get("failed", {}).items():
        print(f"{name:18s} FAILED: {err}")
    print(
        f"limit of the first batch: {limit['captions_per_s']:.1f} captions/s (prefill {limit['prefill_s']:.3f} s "
        f"+ decode {limit['decode_s']:.3f} s)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
