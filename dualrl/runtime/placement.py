"""Where a run's actors go, and the layout printed at start.

When the actors ask for resources (`runtime.worker_cpus` or `runtime.worker_gpus` above 0, as every GPU run
does; `runtime.learner_gpus`, `rollout_gpus` and `reward_gpus` set one kind's own), they are placed through one Ray
placement group, a bundle per actor in a fixed order (learners, rollout workers, reward workers), packed onto as few
nodes as possible: on the same cluster, a run's layout is the same every time. Actors that ask for nothing (the
CPU default shares two cores among all of them) cannot be placed that way, since Ray refuses empty bundles: Ray
starts them where it likes, on the driver's node in practice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dualrl.runtime import ActorTimeout

if TYPE_CHECKING:
    from dualrl.recipe.run import RuntimeSpec
    from dualrl.runtime.ray_calls import Actor

ROLES = ("learner", "rollout worker", "reward worker")


class Placement:
    def __init__(self, spec: RuntimeSpec, counts: list[int]):
        self.spec = spec
        self.first = {role: sum(counts[:i]) for i, role in enumerate(ROLES)}
        self.asks = {role: {"num_cpus": spec.worker_cpus, "num_gpus": spec.gpus(role)} for role in ROLES}
        bundles = [bundle_of(self.asks[role]) for role, n in zip(ROLES, counts) for _ in range(n)]
        self.group = None
        if not any(bundles):
            return
        gpus = [self.asks[role]["num_gpus"] for role, n in zip(ROLES, counts) if n]
        if not all(bundles) or (any(gpus) and not all(gpus)):
            raise ValueError(
                "some actors ask Ray for GPUs (or any resources) and others for none (runtime.worker_cpus, "
                f"runtime.worker_gpus, runtime.learner_gpus/rollout_gpus/reward_gpus: {self.asks}). Every actor runs "
                "on the run's device, so on GPUs each needs a share of one, and Ray refuses empty bundles: give every "
                "kind of actor GPUs (or, on CPUs, CPUs)"
            )
        self.group = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=spec.start_timeout_s)
        if not ready:
            self.remove()
            raise ActorTimeout(
                f"Ray could not place the run's {sum(counts)} actors ({counts[0]} learners, {counts[1]} rollout and "
                f"{counts[2]} reward workers, asking {self.asks}) within runtime.start_timeout_s="
                f"{spec.start_timeout_s:g} s: the cluster lacks those resources (see `ray status`). Lower "
                "runtime.learners/rollout_workers/reward_workers, ask less per actor (runtime.worker_cpus, "
                "runtime.worker_gpus or the learner/rollout/reward ones: fractions share a GPU), or add nodes."
            )

    def options(self, role: str, index: int) -> dict[str, Any]:
        """The `ray.remote` options of actor `index` of `role`."""
        opts: dict[str, Any] = dict(self.asks[role])
        if self.group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.first[role] + index
            )
        return opts

    def remove(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def bundle_of(ask: dict[str, float]) -> dict[str, float]:
    """A placement-group bundle from an actor's `ray.remote` request (Ray's names; nothing asked left out)."""
    return {name: ask[key] for name, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")) if ask[key] > 0}


def own_cards(places: list[dict[str, Any]]) -> bool:
    """Every process (`whereabouts`) holds a GPU that no other of them holds: what NCCL needs (one rank per device)."""
    cards = [(p["node"], g) for p in places for g in p["gpus"][:1]]
    return len(cards) == len(places) and len(set(cards)) == len(cards)


def layout(actors: list[Actor], places: list[dict[str, Any]]) -> str:
    """One line per actor (`places`: each one's `whereabouts`): role, node, GPUs and process."""
    width = max(len(a.role) for a in actors)
    return "\n".join(
        f"  {a.role:<{width}}  node {p['node']}  GPU {','.join(map(str, p['gpus'])) or '-'}  pid {p['pid']}"
        for a, p in zip(actors, places)
    )


def one_card(places: list[dict[str, Any]]) -> bool:
    """Every actor (`whereabouts`) on the first one's node and its one GPU: what CUDA IPC between them needs."""
    first = places[0]
    return len(first["gpus"]) == 1 and all((p["node"], p["gpus"]) == (first["node"], first["gpus"]) for p in places)
