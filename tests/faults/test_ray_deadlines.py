"""Under `runtime.kind=ray`, a frozen actor stops the run within `runtime.call_timeout_s` with an error that
names it, and the Ray processes a run starts end with its driver: after a normal exit, a timeout and SIGTERM.

Each test launches `python -m dualrl.launch` with the tiny recipe in a session of its own and follows the
processes it starts (the driver's descendants, read from /proc while it runs); only those are checked, and
only those are killed if a test fails, so Ray instances of other runs on the machine are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 3.0
START_S = 240.0  # Ray, three actors and their models on 2 busy cores: normally 15-40 s


def _processes() -> dict[int, tuple[int, str]]:
    """Live processes: pid -> (parent pid, command line); zombies count as ended."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we read
            continue
        state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
        if state not in ("Z", "X"):
            table[int(entry)] = (int(parent), cmdline.strip())
    return table


def _descendants(root: int) -> dict[int, str]:
    table = _processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmdline) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdline
                frontier.append(pid)
    return found


class Driver:
    """A training run under Ray in its own session, and every process it started that was seen running."""

    def __init__(self, out: Path, *overrides: str):
        self.out, self.log = out, out.parent / f"{out.name}.log"
        self._log_file = self.log.open("w")
        args = [*TINY, "runtime.kind=ray", "runtime.num_cpus=2", "eval.at_start=false", f"output_dir={out}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dualrl.launch", "recipes/sft_dual.yaml", *args, *overrides],
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: dict[int, set[str]] = {}  # pid -> its command lines (Ray renames a worker for each actor call)

    def watch(self, until: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Record the driver's descendants until `until()` holds; fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not until():
            ended = self.proc.poll() is not None
            self._record()
            if ended and not until():
                pytest.fail(f"the driver ended (exit {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout_s:.0f} s; driver log:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        self._record()

    def _record(self) -> None:
        for pid, cmdline in _descendants(self.proc.pid).items():
            self.seen.setdefault(pid, set()).add(cmdline)

    def actor(self, name: str) -> int | None:
        """The pid of the process hosting actor class `name`, once it is one (Ray renames the worker)."""
        return next((pid for pid, cmds in self.seen.items() if any(c.startswith(f"ray::{name}") for c in cmds)), None)

    def steps_logged(self) -> int:
        metrics = self.out / "metrics.jsonl"
        if not metrics.exists():
            return 0
        return sum(1 for line in metrics.read_text().splitlines() if "train/loss" in json.loads(line))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def left_over(self, grace_s: float = 15.0) -> dict[int, set[str]]:
        """The processes it started that are still alive `grace_s` after the driver ended (fewer if none are)."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = {pid: cmds for pid, cmds in self.seen.items() if pid in _processes()}
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def kill(self) -> None:
        """Whatever of this run still runs (a failing test must not leave it behind)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.seen:
            if pid in _processes():
                os.kill(pid, signal.SIGKILL)
        self._log_file.close()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    started: list[Driver] = []

    def launch(*overrides: str) -> Driver:
        started.append(Driver(tmp_path / "run", *overrides))
        return started[-1]

    yield launch
    for run in started:
        run.kill()


def _ray_process_kinds(seen: dict[int, set[str]]) -> set[str]:
    """Which of Ray's head processes and dualrl's actors were seen (program name or Ray's process title)."""
    names = ("gcs_server", "raylet", "ray::Learner", "ray::RolloutWorker", "ray::RewardWorker")
    return {name for name in names for cmds in seen.values() for cmd in cmds if name in cmd.split(" ")[0]}


def test_a_frozen_actor_stops_the_run_with_its_name_and_its_processes_end(driver):
    """SIGSTOP the reward worker after the first step: its next call passes runtime.call_timeout_s=3 s, and the
    run stops with a non-zero exit within that deadline plus a few seconds, naming the reward worker (its pid),
    the call, the deadline's key and the step; no process the run started is left (the frozen one included)."""
    run = driver("train.steps=50", "eval.every=100", "train.save_every=100", f"runtime.call_timeout_s={CALL_TIMEOUT_S}")
    run.watch(lambda: run.steps_logged() >= 1, START_S, "first step")
    frozen = run.actor("RewardWorker")
    assert frozen is not None, run.seen
    os.kill(frozen, signal.SIGSTOP)
    t0 = time.monotonic()
    run.watch(lambda: run.proc.poll() is not None, CALL_TIMEOUT_S + 60, "exit after the freeze")
    stopped_s = time.monotonic() - t0
    text = run.output()
    assert run.proc.returncode not in (0, None), text[-3000:]
    assert "Traceback" not in text, text[-3000:]  # said in one line by the launcher
    assert f"error: the reward worker (Ray actor RewardWorker, pid {frozen} on node " in text, text[-3000:]
    assert f"within runtime.call_timeout_s={CALL_TIMEOUT_S:g} s at step " in text
    assert "did not answer RewardWorker." in text
    # the freeze can land just after the reward worker's call of a step, so up to one more step runs first
    assert stopped_s < CALL_TIMEOUT_S + 20, stopped_s
    assert _ray_process_kinds(run.seen) == {
        "gcs_server",
        "raylet",
        "ray::Learner",
        "ray::RolloutWorker",
        "ray::RewardWorker",
    }
    assert run.left_over() == {}


def test_ray_processes_end_with_a_driver_that_ends_normally(driver):
    """A run that ends normally (exit 0; here at train.stop_at_step, which skips the final evaluation) leaves none
    of the Ray processes it started: GCS, raylet, agents, actors."""
    run = driver("train.steps=2", "train.stop_at_step=1")
    run.watch(lambda: run.proc.poll() is not None, START_S, "end of a one-step run")
    assert run.proc.returncode == 0, run.output()[-3000:]
    assert {"gcs_server", "raylet", "ray::Learner"} <= _ray_process_kinds(run.seen), run.seen
    assert run.left_over() == {}


def test_ray_processes_end_with_a_driver_stopped_by_sigterm(driver):
    """SIGTERM while the driver waits for its actors: it exits with 143 (128 + SIGTERM) after killing the actors
    and ending the Ray instance it started; none of its processes is left."""
    run = driver("train.steps=50")
    run.watch(lambda: run.actor("RewardWorker") is not None, START_S, "reward actor")
    run.proc.send_signal(signal.SIGTERM)
    run.watch(lambda: run.proc.poll() is not None, 60, "exit after SIGTERM")
    text = run.output()
    assert run.proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "SIGTERM received: stopping the Ray actors" in text
    assert run.left_over() == {}


def test_a_killed_actor_stops_the_run_naming_it_and_the_checkpoint_to_resume_from(driver):
    """SIGKILL one of two learner ranks after the second step (the other then waits in a collective): the run stops
    with exit 1 within seconds (Ray reports the death; neither the collective's nor the call's deadline is waited
    out), one error line naming the dead actor (its pid and node), the call and the step, and the checkpoint the
    same command resumes from; no process the run started is left. (Any actor's death is reported the same way:
    the learner's is the case where the others would otherwise wait.)"""
    actor = "Learner"
    run = driver("train.steps=50", "eval.every=100", "train.save_every=1", "runtime.learners=2")
    run.watch(lambda: run.steps_logged() >= 2, START_S, "two steps")
    victim = run.actor(actor)
    assert victim is not None, run.seen
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    run.watch(lambda: run.proc.poll() is not None, 120, "exit after the kill")
    stopped_s = time.monotonic() - t0
    text = run.output()
    assert run.proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    error = next(line for line in text.splitlines() if line.startswith("error: "))
    assert f"(Ray actor {actor}, pid {victim} on node " in error
    assert f"died during {actor}." in error
    assert "The last checkpoint is " in error and "checkpoints/step_" in error
    assert stopped_s < 30, stopped_s
    assert run.left_over() == {}
