"""The objectives a run can train with, by name: the one place where `algo.name` is read.

An objective says what its steps need and computes the loss:
- `rollout_weights`: whose weights draw the captions a step trains on ("ema": the EMA teacher, as `sft_dual`;
  "policy": the model being trained, as `grpo`), or None when a step has no rollout (`pretrain`);
- `plan(recipe)`: how those captions are drawn (greedy or sampled, how many per region), or None;
- `needs_reference(algo_spec)`: whether it needs a frozen copy of the starting model (GRPO's KL term);
- `iterations`: updates per step on the same batch;
- an instance, built by the learner from the algorithm's spec, its model and that reference, is the loss call.

The driver, the runtimes and the learner get the class from `objective_class(recipe.algo)` and read these; none
of them compares names. A new objective is a file with a class decorated `@register("name")` and one line in
`_MODULES` below (its recipe section goes into `AlgoSpec`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import torch

if TYPE_CHECKING:
    from dualrl.algo.rollout_data import RolloutPlan
    from dualrl.model.grounded_vlm import GroundedVLM
    from dualrl.recipe import AlgoSpec, Recipe


# modules whose objectives register themselves when imported
_MODULES = ("dualrl.algo.objectives", "dualrl.algo.grpo_objective")

OBJECTIVES: dict[str, type[Objective]] = {}


class Objective(Protocol):
    name: ClassVar[str]
    rollout_weights: ClassVar[Literal["ema", "policy"] | None]
    iterations: int

    @classmethod
    def plan(cls, recipe: Recipe) -> RolloutPlan | None: ...

    @classmethod
    def needs_reference(cls, algo_spec: AlgoSpec) -> bool: ...

    def __init__(self, algo_spec: AlgoSpec, model: GroundedVLM, reference: GroundedVLM | None = None): ...

    def __call__(self, model, batch: dict, rollout, generator: torch.Generator): ...


def register(name: str):
    """Class decorator: makes the objective available as `algo.name: <name>`."""

    def add(cls: type) -> type:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(
                f"objective {name!r} is registered twice ({OBJECTIVES[name].__qualname__}, {cls.__qualname__})"
            )
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return add


def objective_class(algo_spec: AlgoSpec) -> type[Objective]:
    """The objective class `algo_spec.name` names."""
    for module in _MODULES:
        importlib.import_module(module)
    try:
        return OBJECTIVES[algo_spec.name]
    except KeyError:
        raise ValueError(
            f"algo.name {algo_spec.name!r}: no such objective (registered: {sorted(OBJECTIVES)})"
        ) from None


def build_objective(algo_spec: AlgoSpec, model: GroundedVLM, reference: GroundedVLM | None = None) -> Objective:
    """The loss call of a run: its objective built on the learner's model (and the reference, when it needs one)."""
    return objective_class(algo_spec)(algo_spec, model, reference)
