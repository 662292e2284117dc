"""Where the workers live: in this process (`local`) or as Ray actors (`ray`). The only package that
imports Ray; everything it hosts is a plain class from `dualrl.workers`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dualrl.recipe import Recipe


class ActorTimeout(RuntimeError):
    """A Ray actor did not answer within its deadline: frozen, dead-locked, not placeable, or slower than allowed
    (raised by `ray_calls.py`; defined here so that catching it imports no Ray)."""


class ActorLost(RuntimeError):
    """A Ray actor's process died (killed, out of memory, its node gone) while the run needed it."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return name


def start_runtime(recipe: Recipe):
    if recipe.runtime.kind == "ray":
        from dualrl.runtime.ray_runtime import RayRuntime

        return RayRuntime(recipe)
    from dualrl.runtime.local import LocalRuntime

    return LocalRuntime(recipe)
