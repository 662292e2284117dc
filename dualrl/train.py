"""The driver loop: one dual-loop step after another, for every algorithm and runtime.

    batch ─ rollout.describe ─ captions ─ reward.score ─ rewards ─ learner.step ─ metrics
                                               sync weights -> rollout/reward every k steps

Algorithms differ inside `learner.step` (the objective), runtimes inside `start_runtime`; this file reads
top to bottom the same way for all of them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from dualrl.algo.registry import objective_class
from dualrl.algo.rollout_data import Rollout
from dualrl.checkpoint import load_latest, save_checkpoint
from dualrl.data.loader import EvalBatches, train_batches
from dualrl.eval.training import evaluate
from dualrl.logger import RunLogger
from dualrl.recipe import Recipe, dump_recipe
from dualrl.runtime import start_runtime

log = logging.getLogger("dualrl")


ROLLOUT_SEED = 1 << 40  # offsets the rollout's seeds from the learner's generator seeds of the same step


def step_seed(seed: int, step: int) -> int:
    """The randomness of one step (caption sampling, Gumbel noise, point sampling, reference choice) is a
    function of the step alone, so a resumed run draws exactly what an uninterrupted one would, and a
    rollout worker in another process samples what an in-process one would."""
    return seed * 1_000_003 + step


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step))


def run(recipe: Recipe) -> dict:
    t_start = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)

    val_batches = EvalBatches(recipe.data, recipe.model.sam.image_size, recipe.eval.batch_size, recipe.eval.split)
    runtime = start_runtime(recipe)
    start_step, position, run_state = 0, 0, {}
    resumed = load_latest(out)
    if resumed is not None:
        learner_state, run_state = resumed
        runtime.learner.load_state_dict(learner_state)
        start_step, position = run_state["step"], run_state["data_position"]
        log.info("resumed from %s at step %d", out / "checkpoints", start_step)
    logger = RunLogger(
        recipe.wandb,
        recipe.train.steps,
        recipe.algo.name,
        out,
        start_step,
        recipe.model_dump(mode="json"),
        resumed=resumed is not None,
    )
    runtime.sync()

    def run_eval(step: int) -> dict:
        metrics, examples = evaluate(runtime, val_batches, recipe.wandb.table_rows)
        logger.log(step, metrics)
        logger.table(step, examples)
        log.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    if start_step == 0 and recipe.eval.at_start:
        run_eval(0)
    plan = objective_class(recipe.algo).plan(recipe)  # how captions are drawn; None: no rollout
    stop = min(recipe.train.steps, recipe.train.stop_at_step or recipe.train.steps)
    batches = train_batches(recipe.data, recipe.model.sam.image_size, position, run_state)
    metrics: dict[str, float] = {}
    t_loop, step = time.time(), start_step
    deadline = t_start + 60 * recipe.train.max_minutes if recipe.train.max_minutes else None
    for step in range(start_step + 1, stop + 1):
        batch = next(batches)
        metrics = batches.metrics()
        rollout = None
        if plan is not None:
            captions = runtime.rollout.describe(batch, plan, ROLLOUT_SEED + step_seed(recipe.train.seed, step))
            scored = runtime.reward.score(batch, captions, plan.group_size)
            rollout = Rollout(captions, plan.group_size, scored.total)
            metrics.update(scored.metrics)
            metrics["train/caption_tokens"] = sum(len(i) for i in captions.ids) / len(captions)
        metrics.update(runtime.learner.step(batch, rollout, step_generator(recipe.train.seed, step)))
        if step % recipe.train.sync_every == 0:
            metrics.update(runtime.sync())
        logger.advance()
        if deadline is not None and step < stop and time.time() > deadline:
            log.info("train.max_minutes reached at step %d: saving; the same command resumes from here", step)
            stop = step
        if step % recipe.train.log_every == 0 or step == stop:
            logger.log(step, metrics)
        if step % recipe.eval.every == 0 or step == recipe.train.steps:
            if rollout is not None and plan.group_size > 1:
                logger.groups(step, batch, rollout, scored)
            metrics.update(run_eval(step))
        if step % recipe.train.save_every == 0 or step == stop:
            save_checkpoint(out, step, runtime.learner.state_dict(), batches.state(), recipe.train.keep_checkpoints)
        if step == stop:
            break

    batches.close()
    steps_run = step - start_step
    loop_s = time.time() - t_loop
    summary = {
        "steps": step,
        "steps_this_run": steps_run,
        "complete": step >= recipe.train.steps,
        "wall_time_s": time.time() - t_start,
        "samples_per_s": steps_run * recipe.data.batch_size / loop_s if steps_run else 0.0,
        "start": logger.logged(0, "eval/"),
        "final": {k: v for k, v in metrics.items() if k.startswith("eval/")},
        "skipped_nonfinite_steps": metrics.get("train/skipped_nonfinite", 0.0),
        "runtime": recipe.runtime.kind,
        "algo": recipe.algo.name,
        "data_skipped": batches.skipped(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.close(summary["final"])
    runtime.shutdown()
    return summary
