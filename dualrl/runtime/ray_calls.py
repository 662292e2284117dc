"""Calls into Ray actors, each with a deadline. Every wait of the Ray runtime goes through `Deadlines`.

A call gets `runtime.call_timeout_s`. An actor's start-up (placement on a node, imports, model build) and the
first call of each of its methods (which may compile kernels, tune them or allocate) get `runtime.start_timeout_s`.
A call that has not answered by then stops the run with `ActorTimeout`, which names the actor (role, class, pid
and node), the call, the deadline's recipe key and the step. A call that failed (the actor raised, or its process
died) raises Ray's error as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from dualrl.runtime import ActorLost, ActorTimeout

STOPS = "The run stops and its actors are killed"
CALL = (
    "runtime.call_timeout_s",
    f"the actor is frozen, dead-locked or slower than the recipe allows. {STOPS}; if calls this slow are expected, "
    "raise runtime.call_timeout_s",
)
FIRST_CALL = (
    "runtime.start_timeout_s",
    "a method's first call gets the start-up deadline (it may compile or allocate), and the actor is frozen, "
    f"dead-locked or slower than that. {STOPS}; if first calls are this slow, raise runtime.start_timeout_s",
)
START = (
    "runtime.start_timeout_s",
    "no node may have the CPUs/GPUs it asks for (runtime.worker_cpus, runtime.worker_gpus: see `ray status`), or "
    f"building its model stalled (its log is under the Ray session's logs/). {STOPS}; if start-up is this slow, "
    "raise runtime.start_timeout_s",
)


def whereabouts() -> dict[str, Any]:
    """Inside an actor: its process id, node address and GPUs, for the layout and error messages."""
    return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


@dataclass(frozen=True)
class Call:
    """A method call in flight on an actor; `what` names it in messages."""

    actor: Actor
    method: str
    ref: ray.ObjectRef
    what: str


class Deadlines:
    """The deadlines of one run's calls into its actors, and the driver's step, which a timeout names."""

    def __init__(self, call_timeout_s: float, start_timeout_s: float):
        self.timeout_s = {"runtime.call_timeout_s": call_timeout_s, "runtime.start_timeout_s": start_timeout_s}
        self.step: int | None = None  # set by the driver loop; None before the first step

    def wait(self, calls: Sequence[Call]) -> None:
        """Return once every call has finished (with its result or its error), within its deadline."""
        self._finish(calls, fetch=False)

    def results(self, calls: Sequence[Call]) -> list[Any]:
        """The calls' results, within their deadline."""
        return self._finish(calls, fetch=True)

    def _finish(self, calls: Sequence[Call], fetch: bool) -> list[Any]:
        for actor in dict.fromkeys(call.actor for call in calls):
            if actor.where is None:
                info = self._await([actor.hello], START, fetch=True)[0]
                actor.where = f"pid {info['pid']} on node {info['node']}"
        deadline = FIRST_CALL if any(call.method not in call.actor.warm for call in calls) else CALL
        values = self._await(calls, deadline, fetch)
        for call in calls:
            call.actor.warm.add(call.method)
        return values

    def _await(self, calls: Sequence[Call], deadline: tuple[str, str], fetch: bool) -> list[Any]:
        """Wait for the calls, each result fetched as soon as its call ends: a dead actor among calls that wait
        for each other (learner ranks in a collective) is named at once, not when the others' collectives time out.
        """
        end = time.monotonic() + self.timeout_s[deadline[0]]
        pending, values = list(dict.fromkeys(call.ref for call in calls)), {}
        while pending:
            left = max(0.0, end - time.monotonic())
            # fetch_local=False: weights handed from actor to actor by reference never come through the driver
            ready, pending = ray.wait(pending, num_returns=1, timeout=left, fetch_local=False)
            if not ready:
                self._late([call for call in calls if call.ref in pending], deadline)
            if not fetch:
                continue
            try:
                values[ready[0]] = ray.get(ready[0], timeout=max(0.0, end - time.monotonic()))
            except GetTimeoutError:
                self._late([call for call in calls if call.ref == ready[0]], deadline)
            except RayActorError as err:
                self._lost(next(call for call in calls if call.ref == ready[0]), err)
        return [values[call.ref] for call in calls] if fetch else []

    def _lost(self, dead: Call, err: RayActorError) -> NoReturn:
        when = f"at step {self.step}" if self.step is not None else "before the first step"
        cause = str(err).strip().splitlines()[0][:300]
        raise ActorLost(
            f"{dead.actor.label()} died during {dead.what} {when} ({cause}). The run stops and its other actors are "
            "killed; see the actor's log under the Ray session's logs/ (out of memory, a killed process or a lost "
            "node)."
        ) from err

    def _late(self, calls: Sequence[Call], deadline: tuple[str, str]) -> NoReturn:
        key, hint = deadline
        when = f"at step {self.step}" if self.step is not None else "before the first step"
        what = "; ".join(f"{call.actor.label()} did not answer {call.what} " for call in calls)
        raise ActorTimeout(f"{what}within {key}={self.timeout_s[key]:g} s {when}: {hint}.")


class Actor:
    """A worker hosted as a Ray actor. Its methods are called like local ones: `actor.step(...)` waits for the
    result within the deadline; `submit` starts a call and returns it, for results handed on by reference.
    Attributes here hide the worker's methods of the same name: none of them may be named like one."""

    def __init__(self, role: str, class_name: str, handle: ray.actor.ActorHandle, deadlines: Deadlines):
        self.role, self.class_name, self.handle = role, class_name, handle
        self._deadlines = deadlines
        self.where: str | None = None  # "pid N on node A" once started
        self.warm: set[str] = set()  # methods called once: later calls get runtime.call_timeout_s
        # queued behind __init__: answers once the actor has started
        self.hello = Call(self, "whereabouts", handle.whereabouts.remote(), "its start-up")

    def label(self) -> str:
        return f"the {self.role} (Ray actor {self.class_name}, {self.where or 'not started yet'})"

    def submit(self, name: str, *args: Any, **kwargs: Any) -> Call:
        ref = getattr(self.handle, name).remote(*args, **kwargs)
        return Call(self, name, ref, f"{self.class_name}.{name}()")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probes: not remote methods
            raise AttributeError(name)
        return lambda *args, **kwargs: self._deadlines.results([self.submit(name, *args, **kwargs)])[0]
