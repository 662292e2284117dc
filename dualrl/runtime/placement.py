"""Where a run's actors go, and the layout printed at start.

When the actors ask for resources (`runtime.worker_cpus` or `runtime.worker_gpus` above 0, as every GPU run
does), they are placed through one Ray placement group, a bundle per actor in a fixed order (learners, rollout
workers, reward workers), packed onto as few nodes as possible: on the same cluster, a run's layout is the same
every time. Actors that ask for nothing (the CPU default shares two cores among all of them) cannot be placed
that way, since Ray refuses empty bundles: Ray starts them where it likes, on the driver's node in practice.
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
        bundle = {k: v for k, v in (("CPU", spec.worker_cpus), ("GPU", spec.worker_gpus)) if v > 0}
        self.group = None
        if not bundle:
            return
        self.group = placement_group([dict(bundle) for _ in range(sum(counts))], strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=spec.start_timeout_s)
        if not ready:
            self.remove()
            raise ActorTimeout(
                f"Ray could not place the run's {sum(counts)} actors ({counts[0]} learners, {counts[1]} rollout and "
                f"{counts[2]} reward workers, each asking {bundle}) within runtime.start_timeout_s="
                f"{spec.start_timeout_s:g} s: the cluster lacks those resources (see `ray status`). Lower "
                "runtime.learners/rollout_workers/reward_workers, ask less per actor (runtime.worker_cpus, "
                "runtime.worker_gpus: fractions share a GPU), or add nodes."
            )

    def options(self, role: str, index: int) -> dict[str, Any]:
        """The `ray.remote` options of actor `index` of `role`."""
        opts: dict[str, Any] = {"num_cpus": self.spec.worker_cpus, "num_gpus": self.spec.worker_gpus}
        if self.group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.first[role] + index
            )
        return opts

    def remove(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


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
