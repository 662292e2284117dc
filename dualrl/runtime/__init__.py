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


def intra_op_threads(threads: int | None, device: str) -> int | None:
    """torch's intra-op threads for a process of the run whose model works on `device`: the recipe's `train.threads`
    where it sets them; else one on a GPU, as torchrun gives its processes when a node runs several (the host's
    own tensor work is small there, and an idle pool's threads spin on the cores the loader workers need: the
    pretrain_tiny loop on a 16-core H200 host ran 16.1 steps/s with one thread against 10.4-12.3 with torch's 16,
    its pool keeping 4-6 cores busy); None on a CPU: torch's default."""
    if threads:
        return threads
    return 1 if device.startswith("cuda") else None


def set_intra_op_threads(threads: int | None, device: str) -> None:
    """`intra_op_threads` applied to this process (torch's default is left alone where it gives None)."""
    n = intra_op_threads(threads, device)
    if n is not None:
        torch.set_num_threads(n)


def start_runtime(recipe: Recipe):
    if recipe.runtime.kind == "ray":
        from dualrl.runtime.ray_runtime import RayRuntime

        return RayRuntime(recipe)
    from dualrl.runtime.local import LocalRuntime

    return LocalRuntime(recipe)
