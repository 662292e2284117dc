"""Where the actors go: each kind asks for its own GPUs, and a process group runs on NCCL only when its processes
hold cards of their own. Ray is told the machine has 2 GPUs (none is touched), as a cluster's node would say."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from dualrl.recipe import load_recipe  # noqa: E402
from dualrl.runtime.placement import ROLES, Placement, own_cards  # noqa: E402
from dualrl.runtime.ray_calls import whereabouts  # noqa: E402
from dualrl.runtime.ray_runtime import weight_path  # noqa: E402
from dualrl.workers.data_parallel import backend  # noqa: E402


def _place(node: str, gpus: list[str]) -> dict:
    return {"node": node, "gpus": gpus, "pid": 1}


@pytest.mark.parametrize(
    ("places", "own"),
    [
        ([_place("a", ["0"]), _place("a", ["1"])], True),
        ([_place("a", ["0"]), _place("b", ["0"])], True),  # the same index on another node is another card
        ([_place("a", ["0"]), _place("a", ["0"])], False),
        ([_place("a", ["0", "1"]), _place("a", ["1"])], True),  # a process with two cards works on its first
        ([_place("a", ["0"]), _place("a", [])], False),
    ],
)
def test_own_cards(places, own):
    assert own_cards(places) is own


def test_a_learner_on_its_card_and_the_workers_sharing_another():
    """learner_gpus 1 and rollout/reward 0.5 on a node of 2 GPUs: the learner alone on one card, the two workers on
    the other; so the weights go over NCCL (learner 0 and each worker on different cards), not by CUDA IPC."""
    spec = load_recipe(
        "recipes/sft_dual.yaml",
        ["runtime.kind=ray", "runtime.learner_gpus=1", "runtime.worker_gpus=0.5", "output_dir=unused"],
    ).runtime
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    try:
        placement = Placement(spec, [1, 1, 1])

        @ray.remote
        class Where:
            def where(self) -> dict:
                return whereabouts()

        actors = [Where.options(**placement.options(role, 0)).remote() for role in ROLES]
        learner, rollout, reward = ray.get([a.where.remote() for a in actors], timeout=120)
        placement.remove()
    finally:
        ray.shutdown()
    assert len(learner["gpus"]) == 1 and rollout["gpus"] == reward["gpus"] != learner["gpus"]
    places = [learner, rollout, reward]
    channels = backend("cuda", own_cards([learner, rollout]) and own_cards([learner, reward]))
    assert channels == "nccl" and backend("cuda", own_cards([rollout, reward])) == "gloo"
    assert weight_path("auto", "cuda", channels, places) == "collective"


@pytest.mark.parametrize("cpus", [0, 1])
def test_actors_without_a_gpu_beside_others_with_one_are_refused(cpus):
    """On GPUs every actor runs on the run's device: one kind asking none (with CPUs or without) is refused before
    anything is placed."""
    spec = load_recipe(
        "recipes/sft_dual.yaml",
        ["runtime.kind=ray", "runtime.learner_gpus=1", f"runtime.worker_cpus={cpus}", "output_dir=unused"],
    ).runtime
    with pytest.raises(ValueError, match="others for none"):
        Placement(spec, [1, 1, 1])
