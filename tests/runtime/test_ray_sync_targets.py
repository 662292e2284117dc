"""Which weights the Ray runtime's sync sends where, with the actors replaced by recorders: the EMA to the
reward workers and the EMA or the policy to the rollout workers, a frozen teacher's EMA only once; on each of the
three paths (object store, collective, CUDA IPC)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from dualrl.runtime.ray_runtime import RayRuntime


class _Learner:
    def __init__(self, sent: list):
        self.sent = sent

    def submit_all(self, method: str, *args):
        self.sent.append((method, *args))
        if method == "share_weights":  # the shared buffers' handles, standing for themselves
            return [SimpleNamespace(value=SimpleNamespace(which=args[0], nbytes=5))]
        return [SimpleNamespace(ref=args[-1], value=7)]  # the weights' kind stands for its object ref

    def sync_bytes(self) -> int:
        return 10


class _Workers:
    def __init__(self, name: str, sent: list):
        self.name, self.sent = name, sent
        self.actors = [self]

    def load_weights(self, ref) -> list:
        self.sent.append((self.name, ref))
        return []

    def submit(self, method: str, shared) -> SimpleNamespace:
        self.sent.append((method, self.name, shared.which))
        return SimpleNamespace(value=None)


def _runtime(rollout_weights: str, frozen: bool, path: str) -> tuple[RayRuntime, list]:
    sent: list = []
    runtime = object.__new__(RayRuntime)
    runtime.learner = _Learner(sent)
    runtime.rollout, runtime.reward = _Workers("rollout", sent), _Workers("reward", sent)
    runtime.deadlines = SimpleNamespace(wait=lambda calls: None, results=lambda calls: [c.value for c in calls])
    runtime.weight_sync = path
    runtime.channels = {"rollout": [], "reward": []} if path == "collective" else {}
    runtime.rollout_weights = rollout_weights
    runtime.ema_frozen, runtime._ema_sent = frozen, False
    return runtime, sent


@pytest.mark.parametrize("path", ["object_store", "collective", "cuda_ipc"])
@pytest.mark.parametrize(
    ("rollout_weights", "frozen", "later"),
    [
        ("ema", False, {("rollout", "ema"), ("reward", "ema")}),
        ("policy", False, {("rollout", "policy"), ("reward", "ema")}),
        ("ema", True, set()),
        ("policy", True, {("rollout", "policy")}),
    ],
)
def test_sync_targets(rollout_weights, frozen, later, path):
    runtime, sent = _runtime(rollout_weights, frozen, path)
    first = {("rollout", rollout_weights), ("reward", "ema")}
    for expected in (first, later, later):
        sent.clear()
        metrics = runtime.sync()
        if path == "cuda_ipc":  # learner 0 shares each kind once; each worker copies what it takes
            kinds = [x[1] for x in sent if x[0] == "share_weights"]
            assert sorted(kinds) == sorted({kind for _, kind in expected})
            got = {(name, kind) for method, name, kind in (x for x in sent if x[0] == "receive_shared")}
            assert metrics["sync/bytes"] == 5 * len(kinds)
        elif path == "collective":  # a broadcast per channel: the learner sends, each channel's members receive
            got = {(name, kind) for method, name, kind in sent}
            assert all(method == "send_weights" for method, *_ in sent)
            assert metrics["sync/bytes"] == 7 * len(expected)
        else:  # one object-store copy per kind of weights, read by each worker group
            got = {x for x in sent if x[0] in ("rollout", "reward")}
            kinds = [kind for method, kind in (x for x in sent if x[0] == "sync_state")]
            assert sorted(kinds) == sorted({kind for _, kind in expected})
            assert metrics["sync/bytes"] == 10 * len(kinds)
        assert got == expected
