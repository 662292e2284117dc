"""The driver loop: one dual-loop step after another, for every algorithm and runtime.

    batch ─ rollout.describe ─ captions ─ reward.score ─ rewards ─ learner.step ─ metrics
                                               sync weights -> rollout/reward every k steps

Algorithms differ inside `learner.step` (the objective), runtimes inside `start_runtime`; this file reads
top to bottom the same way for all of them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from pathlib import Path

import torch

from dualrl.algo.registry import objective_class
from dualrl.checkpoint import has_checkpoint, load_latest, retarget_optimizer, save_checkpoint
from dualrl.data.loader import EvalBatches, train_batches
from dualrl.eval.training import evaluate
from dualrl.logger import RunLogger, null_if_nonfinite
from dualrl.recipe import Recipe, dump_recipe
from dualrl.recipe.resume import Change, check_resume
from dualrl.runtime import ActorLost, ActorTimeout, resolve_device, set_intra_op_threads, start_runtime
from dualrl.runtime.stream import RolloutStream

log = logging.getLogger("dualrl")


ROLLOUT_SEED = 1 << 40  # offsets the rollout's seeds from the learner's generator seeds of the same step


def step_seed(seed: int, step: int) -> int:
    """The randomness of one step (caption sampling, Gumbel noise, point sampling, reference choice) is a
    function of the step alone, so a resumed run draws exactly what an uninterrupted one would, and a
    rollout worker in another process samples what an in-process one would."""
    return seed * 1_000_003 + step


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step))


class TrainingDiverged(RuntimeError):
    """`train.max_nonfinite_steps` steps in a row had a non-finite loss, gradient or weights: the run stopped."""


def diverged_message(recipe: Recipe, step: int, report: list[str], last_saved: int | None) -> str:
    """Where it stopped, what was non-finite (the first bad updates and the last), which checkpoint stays, and what
    to try."""
    k, o = recipe.train.max_nonfinite_steps, recipe.optim
    if len(report) > 3:
        report = [*report[:2], f"({len(report) - 3} more)", report[-1]]
    saved = f"The last checkpoint, step_{last_saved}, stays" if last_saved else "No checkpoint was written"
    return (
        f"training stopped at step {step}: {k} steps in a row had a non-finite loss, gradient or weights "
        f"(train.max_nonfinite_steps={k}): {'; '.join(report)}. {saved}; none is written from such weights. "
        f"Try a lower optim.lr (now {o.lr:g}), a longer optim.warmup_ratio (now {o.warmup_ratio:g}) or a smaller "
        f"optim.grad_clip (now {o.grad_clip:g}), and look for broken inputs if the loss was non-finite at once."
    )


class PauseClock:
    """The time this process spends in Python's cyclic garbage collector, by `gc.callbacks`: `take()` returns the
    seconds and the full (generation-2) collections since the last take (or since the clock was made) and starts
    counting again. A process that has built and compiled a model tracks about a million objects, and a full
    collection walks them all (0.35-0.6 s on a 2-core CPU; on an H200's host 0.4 s in `pretrain_tiny`, 0.6 s in the 4B
    learner's process), so the driver logs the collector's share of a step (`step/gc/ms`) beside the step's time."""

    def __init__(self):
        self._start = 0.0
        self.seconds = 0.0
        self.full = 0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.full += info["generation"] == 2

    def take(self) -> tuple[float, int]:
        seconds, full = self.seconds, self.full
        self.seconds, self.full = 0.0, 0
        return seconds, full

    def close(self) -> None:
        if self._tick in gc.callbacks:
            gc.callbacks.remove(self._tick)


class StepWindow:
    """The steps since the last log line, for `step/mean/ms`: the wall time from that line (or the loop's start) to
    this one, evaluations and checkpoints left out, over their number. On a GPU it is the true time a step takes, where
    `step/ms` at a step that reads no figures back times only the launches. `step/gc/ms`: the time this process spent
    in Python's cyclic collector over the same window, per step (evaluations and checkpoints included)."""

    def __init__(self):
        self.start, self.steps, self.aside_s = time.perf_counter(), 0, 0.0
        self.pauses = PauseClock()

    @contextlib.contextmanager
    def aside(self):
        """Time spent in this block is left out of the window (an evaluation, a checkpoint)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.aside_s += time.perf_counter() - t0

    def close(self) -> dict[str, float]:
        """The window's mean step time and collector time per step, in ms; the next window starts now."""
        now = time.perf_counter()
        steps = max(self.steps, 1)
        out = {"step/mean/ms": 1000 * (now - self.start - self.aside_s) / steps}
        out["step/gc/ms"] = 1000 * self.pauses.take()[0] / steps
        self.start, self.steps, self.aside_s = now, 0, 0.0
        return out


def save_if_finite(runtime, out: Path, step: int, run_state: dict, keep: int, ahead: dict | None = None) -> bool:
    """Write the step's checkpoint unless the learner's weights or EMA are non-finite (then the last one stays).
    `ahead`: the next step's captions and rewards when they were made ahead (runtime.async_rollout)."""
    broken = runtime.learner.nonfinite_weights()
    if broken:
        log.error("checkpoint of step %d not written: non-finite weights in %s", step, ", ".join(broken[:3]))
        return False
    save_checkpoint(out, step, {**runtime.learner.state_dict(), "ahead": ahead}, run_state, keep)
    return True


def _check_resume(out: Path, recipe: Recipe) -> list[Change]:
    """A resuming run's recipe against the one its checkpoints were made with (recipe.yaml): the changes it may
    apply; a RecipeError listing those it may not (dualrl/recipe/resume.py says which are which)."""
    if not has_checkpoint(out):
        return []
    saved = out / "recipe.yaml"
    if not saved.is_file():
        log.warning("%s is missing: the recipe cannot be compared with the one the checkpoints were made with", saved)
        return []
    return check_resume(saved, recipe)


def run(recipe: Recipe) -> dict:
    """Train as the recipe says. However the run ends (its last step, an exception, SIGTERM or SIGINT), its
    runtime ends with it: Ray actors are killed and a Ray instance the run started is shut down."""
    with contextlib.ExitStack() as stack:
        try:
            return _train(recipe, stack)
        except (ActorTimeout, ActorLost) as err:
            raise type(err)(f"{err} {resume_point(Path(recipe.output_dir))}") from err


def resume_point(out: Path) -> str:
    """Where the same command would resume: the step the `latest` pointer names, or a fresh start."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return "No checkpoint was written: the same command starts again from the beginning."
    return f"The last checkpoint is {pointer.parent / pointer.read_text().strip()}: the same command resumes from it."


def _resume(
    out: Path, recipe: Recipe, changes: list, resumed: tuple[dict, dict] | None, runtime
) -> tuple[int, int, dict]:
    """The newest intact checkpoint's state into the learner, with the recipe changes a resume may apply (a new
    learning rate or length retargets the optimizer's schedule); (start step, data position, run state)."""
    if resumed is None:
        return 0, 0, {}
    learner_state, run_state = resumed
    learner_state = {k: v for k, v in learner_state.items() if k != "ahead"}  # the driver's, not the learner's
    if any(c.key.startswith("optim.") or c.key == "train.steps" for c in changes):
        retarget_optimizer(learner_state, recipe.optim, recipe.train.steps)
    runtime.learner.load_state_dict(learner_state)
    saved_ranks, ranks = len(learner_state.get("rank_rng", [])) + 1, recipe.runtime.learners
    if saved_ranks != ranks:
        streams = f"ranks {saved_ranks} and up start new dropout streams" if ranks > saved_ranks else "no rank is new"
        log.info(
            "the checkpoint was written by %d learner(s), this run has %d (runtime.learners): the weights, EMA and "
            "optimizer carry over; %s",
            saved_ranks,
            ranks,
            streams,
        )
    start_step = run_state["step"]
    log.info("resumed from %s at step %d", out / "checkpoints" / f"step_{start_step}", start_step)
    for change in changes:
        log.info("recipe changed since the last start, applied from step %d: %s", start_step + 1, change)
    return start_step, run_state["data_position"], run_state


def _train(recipe: Recipe, stack: contextlib.ExitStack) -> dict:
    t_start = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    changes = _check_resume(out, recipe)  # before anything is built or written
    resumed = load_latest(out)  # the newest intact checkpoint (a bad newer one named in the log); None: fresh
    set_intra_op_threads(recipe.train.threads, resolve_device(recipe.train.device))

    val_batches = EvalBatches(recipe.data, recipe.model.sam.image_size, recipe.eval.batch_size, recipe.eval.split)
    runtime = stack.enter_context(start_runtime(recipe))
    start_step, position, run_state = _resume(out, recipe, changes, resumed, runtime)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))  # only now: a refused or failed resume leaves it as it was
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
    on_gpu_here = recipe.runtime.kind == "local" and torch.device(resolve_device(recipe.train.device)).type == "cuda"
    batches = train_batches(recipe.data, recipe.model.sam.image_size, position, run_state, pin=on_gpu_here)
    stack.callback(batches.close)  # however the loop ends, the loader's workers (and receiving thread) end with it
    rollout_seed = lambda step: ROLLOUT_SEED + step_seed(recipe.train.seed, step)  # noqa: E731
    stream = stack.enter_context(RolloutStream(runtime, batches, plan, rollout_seed, recipe.runtime))
    stream.restore(resumed[0].get("ahead") if resumed is not None else None)
    metrics: dict[str, float] = {}
    t_loop, step = time.time(), start_step
    failure, last_saved = None, start_step or None
    deadline = t_start + 60 * recipe.train.max_minutes if recipe.train.max_minutes else None
    train = recipe.train
    window = StepWindow()
    stack.callback(window.pauses.close)
    for step in range(start_step + 1, stop + 1):
        runtime.step, t_step = step, time.perf_counter()  # the step is named if a remote call times out
        # batch, captions, rewards (with async_rollout: made during the last step, and the next one started, also
        # at a stop before train.steps, so that its checkpoint holds it)
        inputs = stream.take(step, recipe.train.steps)
        batch, rollout, metrics = inputs.batch, inputs.rollout, inputs.metrics
        if deadline is not None and step < stop and time.time() > deadline:
            log.info("train.max_minutes reached at step %d: saving; the same command resumes from here", step)
            stop = step
        t_learn = time.perf_counter()
        metrics["step/wait/ms"] = 1000 * (t_learn - t_step)  # for the batch, captions and rewards
        # The update's figures come back from the device only on the steps that use them: a GPU learner does not
        # wait for the device in between, and its bad updates are counted (and a divergence seen) at those steps
        read = step == stop or any(step % k == 0 for k in (train.log_every, train.save_every, recipe.eval.every))
        learned = runtime.learner.step(batch, rollout, step_generator(train.seed, step), read=read)
        metrics.update(learned)
        metrics["step/learn/ms"] = 1000 * (time.perf_counter() - t_learn)
        # the teacher (rollout and reward weights) follows the EMA; a run without captions reads it only to evaluate
        if plan is not None and step % train.sync_every == 0:
            stream.settle()  # the step made ahead keeps the weights it started with
            metrics.update(runtime.sync())
        metrics["step/ms"] = 1000 * (time.perf_counter() - t_step)  # rollout, reward, update and sync
        window.steps += 1
        logger.advance()
        if learned.get("train/nonfinite_longest_run", 0.0) >= train.max_nonfinite_steps:
            failure = diverged_message(recipe, step, runtime.learner.nonfinite_report(), last_saved)
            stop = step
        if step % train.log_every == 0 or step == stop:
            metrics.update(window.close())
            logger.log(step, metrics)
        if failure is not None:
            break  # no evaluation and no checkpoint of these weights
        if step % recipe.eval.every == 0 or step == train.steps:
            if rollout is not None and plan.group_size > 1:
                logger.groups(step, batch, rollout, inputs.scored)
            stream.settle()  # the next step's captions, made ahead: step work, timed in the window
            with window.aside():
                if plan is None:
                    metrics.update(runtime.sync())
                metrics.update(run_eval(step))
        due = step % train.save_every == 0 or step == stop
        with window.aside():
            ahead = stream.ahead_state(step) if due else None
            if due and save_if_finite(runtime, out, step, inputs.data_state, train.keep_checkpoints, ahead):
                last_saved = step
        if step == stop:
            break

    stream.settle()  # a step made ahead of a stop is dropped, but not while it still reads the loader
    stream.close()
    batches.close()
    summary = {
        "steps": step,
        "steps_this_run": step - start_step,
        "complete": failure is None and step >= recipe.train.steps,
        "wall_time_s": time.time() - t_start,
        "samples_per_s": (step - start_step) * recipe.data.batch_size / (time.time() - t_loop),
        "start": logger.logged(0, "eval/"),
        "final": {k: v for k, v in metrics.items() if k.startswith("eval/")},
        "skipped_nonfinite_steps": metrics.get("train/skipped_nonfinite", 0.0),
        "runtime": recipe.runtime.kind,
        "algo": recipe.algo.name,
        "data_skipped": batches.skipped(),
        **({"error": failure} if failure is not None else {}),
    }
    (out / "summary.json").write_text(json.dumps(null_if_nonfinite(summary), indent=1))
    logger.close(summary["final"])
    runtime.shutdown()
    if failure is not None:
        raise TrainingDiverged(failure)
    return summary
