"""Ray runtime: learner, rollout and reward workers as Ray actors.

The driver talks to them through `ray_calls.Actor`, which makes a remote call look like a local one, so the
driver loop is the same code for both runtimes; every call has a deadline (`runtime.call_timeout_s`, and
`runtime.start_timeout_s` for an actor's start-up). Weights go from learner rank 0 to the workers by the path
`weight_path` picks (`runtime.weight_sync`): a broadcast over weight channels, CUDA IPC on a shared card, or one copy
in the object store handed by reference to both kinds of workers.

The Ray processes a run starts end with it: `shutdown` kills the actors and ends the Ray instance this run
started; the driver loop calls it at the end, and through the runtime's context manager on an exception,
SIGTERM or SIGINT (handlers installed here turn those into an exit through it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import ray
import torch

from dualrl.algo.registry import objective_class
from dualrl.runtime import intra_op_threads, resolve_device
from dualrl.runtime.cuda_ipc import IpcReceiver, IpcSender, SharedWeights
from dualrl.runtime.groups import LearnerGroup, RewardGroup, RolloutGroup
from dualrl.runtime.placement import Placement, layout, one_card, own_cards
from dualrl.runtime.ray_calls import Actor, Deadlines, whereabouts
from dualrl.runtime.weight_channel import WeightChannel
from dualrl.workers import Learner, RewardWorker, RolloutWorker, data_parallel
from dualrl.workers.data_parallel import free_address

if TYPE_CHECKING:
    from dualrl.recipe import Recipe

log = logging.getLogger("dualrl")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _in_actor(cls: type, threads: int | None, device: str) -> type:
    class Hosted(cls):
        def __init__(self, *args, **kwargs):
            # Ray sets OMP_NUM_THREADS=1 for actors without CPUs. On a CPU the workers take turns, so each may use
            # the machine's cores while it runs; on a GPU one thread (intra_op_threads), unless the recipe says.
            torch.set_num_threads(intra_op_threads(threads, device) or os.cpu_count() or 1)
            super().__init__(*args, **kwargs)

        def whereabouts(self) -> dict[str, Any]:
            return whereabouts()

        def rendezvous_address(self) -> str:
            """host:port on this actor's node for a process group's rendezvous (learner rank 0)."""
            return free_address()

        def open_weight_channel(
            self, name: str, address: str, rank: int, size: int, backend: str, timeout_s: float
        ) -> None:
            self._channels = getattr(self, "_channels", {})
            self._channels[name] = WeightChannel(address, rank, size, str(self.model.device), backend, timeout_s)

        def send_weights(self, name: str, which: str) -> int:
            """Learner rank 0: broadcast the policy's or the EMA's trainable tensors on channel `name`. The other
            ranks make this call too when the learners shard the weights: they help gather them, and send nothing."""
            tensors = self.sync_tensors(which)
            channel = getattr(self, "_channels", {}).get(name)
            return channel.send(tensors) if channel is not None else 0

        def receive_weights(self, name: str) -> None:
            """A worker: take the tensors broadcast on channel `name` into its model."""
            self.load_weights(self._channels[name].receive(self.model.trainable_state()))

        def share_weights(self, which: str) -> SharedWeights | None:
            """Learner rank 0: copy the policy's or the EMA's trainable tensors into the buffers it shares by CUDA
            IPC, and return their handles. The other ranks make this call too when the learners shard the weights
            (they help gather them) and return None."""
            tensors = self.sync_tensors(which)
            if not tensors:
                return None
            self._ipc_sender = getattr(self, "_ipc_sender", None) or IpcSender()
            return self._ipc_sender.share(which, tensors)

        def receive_shared(self, shared: SharedWeights) -> None:
            """A worker on learner 0's card: copy the weights out of its shared buffers into this model."""
            self._ipc_receiver = getattr(self, "_ipc_receiver", None) or IpcReceiver(self.model.device)
            self.load_weights(self._ipc_receiver.receive(shared, self.model.trainable_state()))
            self._ipc_receiver.done()

    Hosted.__name__ = Hosted.__qualname__ = cls.__name__
    return Hosted


SYNC_PATHS = {
    "collective": "a collective",
    "cuda_ipc": "CUDA IPC on learner 0's card",
    "object_store": "the object store",
}


def weight_path(asked: str, device: str, channel_backend: str, places: list[dict[str, Any]]) -> str:
    """`runtime.weight_sync` resolved for this run's layout (`places`: the actors' whereabouts, learners first;
    `channel_backend`: what the weight channels would run on, NCCL when learner 0 and each channel's workers all
    hold cards of their own)."""
    shared_card = device.startswith("cuda") and one_card(places)
    if asked == "auto":
        return "collective" if channel_backend == "nccl" else "cuda_ipc" if shared_card else "object_store"
    if asked == "cuda_ipc" and not shared_card:
        where = sorted({f"node {p['node']} GPU {','.join(p['gpus']) or '-'}" for p in places})
        raise ValueError(
            "runtime.weight_sync=cuda_ipc needs every actor on one GPU of one node, with train.device cuda; this "
            f"run's actors are on {where} (train.device {device}). Use runtime.weight_sync=object_store, or "
            "collective when learner 0 and the workers hold cards of their own"
        )
    return asked


class RayRuntime:
    def __init__(self, recipe: Recipe):
        spec = recipe.runtime
        self._closed, self._actors, self._handlers = False, [], {}
        self._placement: Placement | None = None
        self._signal: int | None = None  # SIGTERM or SIGINT, once received
        self._owns_ray = not ray.is_initialized()  # a caller's own Ray instance stays up after the run
        self.deadlines = Deadlines(spec.call_timeout_s, spec.start_timeout_s)
        try:
            if self._owns_ray:
                ray.init(
                    address=spec.address,
                    num_cpus=spec.num_cpus if spec.address is None else None,
                    include_dashboard=False,
                    log_to_driver=True,
                )
            # After ray.init: Ray's core installs a SIGTERM handler in the driver that aborts the process
            # without Python's cleanup.
            self._handlers = self._stop_on_signals()
            device = resolve_device(recipe.train.device)
            threads = recipe.train.threads
            self._placement = placement = Placement(spec, [spec.learners, spec.rollout_workers, spec.reward_workers])

            def start(role: str, cls: type, count: int, *args: Any) -> list[Actor]:
                actors = []
                for i in range(count):
                    opts = placement.options(role, i)
                    handle = ray.remote(**opts)(_in_actor(cls, threads, device)).remote(*args)
                    name = f"{role} {i}" if count > 1 else role
                    actors.append(Actor(name, cls.__name__, handle, self.deadlines))
                self._actors.extend(actors)
                return actors

            learners = start(
                "learner", Learner, spec.learners, recipe.model, recipe.algo, recipe.optim, recipe.train, device
            )
            rollouts = start("rollout worker", RolloutWorker, spec.rollout_workers, recipe.model, device)
            rewards = start("reward worker", RewardWorker, spec.reward_workers, recipe.model, recipe.rewards, device)
            places = self.deadlines.results([a.submit("whereabouts") for a in self._actors])
            log.info("layout:\n%s", layout(self._actors, places))
            # NCCL for a group whose processes each hold a card of their own (one rank per device), gloo otherwise
            at_rollout = places[spec.learners : spec.learners + spec.rollout_workers]
            at_reward = places[spec.learners + spec.rollout_workers :]
            backend = data_parallel.backend(device, own_cards(places[: spec.learners]))
            channel_backend = data_parallel.backend(
                device, all(own_cards([places[0], *at]) for at in (at_rollout, at_reward))
            )
            self.learner = LearnerGroup(
                learners, self.deadlines, backend, spec.collective_timeout_s, spec.learner_sharding
            )
            self.rollout = RolloutGroup(rollouts, self.deadlines)
            self.reward = RewardGroup(rewards, self.deadlines)
            self.weight_sync = weight_path(spec.weight_sync, device, channel_backend, places)
            self.channels = {"rollout": rollouts, "reward": rewards} if self.weight_sync == "collective" else {}
            for name, members in self.channels.items():
                self._open_channel(name, learners[0], members, channel_backend, spec.collective_timeout_s)
            log.info("weights reach the workers through %s", SYNC_PATHS[self.weight_sync])
        except BaseException:
            self.shutdown(graceful=False)
            if self._signal is not None:
                raise SystemExit(128 + self._signal) from None
            raise
        self.rollout_weights = objective_class(recipe.algo).rollout_weights
        self.ema_frozen, self._ema_sent = recipe.algo.ema_decay == 1.0, False

    @property
    def step(self) -> int | None:
        """The driver's step, named when a call times out."""
        return self.deadlines.step

    @step.setter
    def step(self, step: int | None) -> None:
        self.deadlines.step = step

    def _open_channel(self, name: str, root: Actor, members: list[Actor], backend: str, timeout_s: float) -> None:
        """A weight channel: learner rank 0 and `members`, each joining the group at rank 0's address."""
        address, size = root.rendezvous_address(), 1 + len(members)
        ranks = [(root, 0), *((w, 1 + i) for i, w in enumerate(members))]
        self.deadlines.results(
            [a.submit("open_weight_channel", name, address, r, size, backend, timeout_s) for a, r in ranks]
        )

    def sync(self) -> dict[str, float]:
        """Weights straight from learner rank 0 to the workers: the EMA to the reward workers, and to the rollout
        workers the EMA (`sft_dual`) or the policy (`grpo`); broadcast over the weight channels, copied by CUDA IPC
        on a shared card, or through the object store (the driver only passes refs). A frozen teacher
        (`algo.ema_decay: 1`) is sent once: later syncs send only what changes (`grpo`'s policy), or nothing."""
        t0 = time.perf_counter()
        targets = [("rollout", self.rollout_weights), ("reward", "ema")]
        if self.ema_frozen and self._ema_sent:
            targets = [(name, which) for name, which in targets if which != "ema"]
        self._ema_sent = True
        if not targets:
            return {"sync/bytes": 0.0, "sync/ms": 1000 * (time.perf_counter() - t0)}
        if self.weight_sync == "cuda_ipc":
            return self._share(targets, t0)
        if self.channels:
            sent = []
            for name, which in targets:
                members = self.channels[name]
                calls = [
                    *self.learner.submit_all("send_weights", name, which),
                    *(w.submit("receive_weights", name) for w in members),
                ]
                sent.append(self.deadlines.results(calls)[0])
            return {"sync/bytes": float(sum(sent)), "sync/ms": 1000 * (time.perf_counter() - t0)}
        # rank 0's call first in each: the others only help gather
        kinds = [kind for kind in ("ema", "policy") if kind in dict(targets).values()]
        refs = {kind: self.learner.submit_all("sync_state", kind) for kind in kinds}
        self.deadlines.wait([c for calls in refs.values() for c in calls])  # a stuck learner is named as such
        workers = {"rollout": self.rollout, "reward": self.reward}
        self.deadlines.results([c for name, which in targets for c in workers[name].load_weights(refs[which][0].ref)])
        # one copy per kind of weights in the object store; each worker reads its copy from there
        return {
            "sync/bytes": float(len(refs) * self.learner.sync_bytes()),
            "sync/ms": 1000 * (time.perf_counter() - t0),
        }

    def _share(self, targets: list[tuple[str, str]], t0: float) -> dict[str, float]:
        """The CUDA IPC sync: learner rank 0 copies each kind of weights into its shared buffers, then the workers
        copy them out on the same card."""
        shared = {}
        for which in dict.fromkeys(which for _, which in targets):
            shared[which] = self.deadlines.results(self.learner.submit_all("share_weights", which))[0]
            if shared[which] is None:
                raise RuntimeError(f"cuda_ipc weight sync: learner rank 0 has no trainable {which} tensors to share")
        groups = {"rollout": self.rollout.actors, "reward": self.reward.actors}
        calls = [w.submit("receive_shared", shared[which]) for name, which in targets for w in groups[name]]
        self.deadlines.results(calls)
        return {
            "sync/bytes": float(sum(s.nbytes for s in shared.values())),
            "sync/ms": 1000 * (time.perf_counter() - t0),
        }

    def __enter__(self) -> RayRuntime:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.shutdown(graceful=exc_type is None)
        if self._signal is not None:  # a wait inside Ray turns the handler's SystemExit(128 + n) into SystemExit(1)
            raise SystemExit(128 + self._signal)

    def shutdown(self, graceful: bool = True) -> None:
        """Kill the actors (a frozen one too) and end the Ray instance this run started, then give back the
        signal handlers; a second call does nothing. `graceful` (the run ended normally) first lets the reward
        worker close its plugins, within the call deadline."""
        if self._closed:
            return
        self._closed = True
        try:
            if graceful:
                self.reward.close()
        finally:
            try:
                for actor in self._actors:
                    ray.kill(actor.handle, no_restart=True)
                if self._placement is not None:
                    self._placement.remove()
            finally:
                if self._owns_ray:
                    ray.shutdown()
                for signum, handler in self._handlers.items():
                    signal.signal(signum, handler)

    def _stop_on_signals(self) -> dict[int, Any]:
        """SIGTERM and SIGINT end the run by an exception (SystemExit 128+signal), so the driver's cleanup kills
        the actors and ends Ray; returns the handlers to restore (Ray's C-level one cannot be: the default)."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # Python only lets the main thread handle signals
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        return {signum: signal.SIG_DFL if handler is None else handler for signum, handler in previous.items()}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._closed:
            log.warning("%s received while the Ray actors are being stopped: still stopping", name)
            return
        log.error("%s received: stopping the Ray actors and the Ray instance this run started", name)
        self._signal = signum
        raise SystemExit(128 + signum)
