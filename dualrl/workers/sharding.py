"""FSDP2 for the learner group (`runtime.learner_sharding: fsdp`): each of the N learner ranks holds 1/N of the
model's parameters, their gradients and AdamW states.

`fully_shard` is applied to every repeated block (the LLM's decoder layers, the vision tower's layers, SAM2's
mask-decoder blocks: `train_compile.block_stacks`), then to the learner's `ModelCall`, the root whose one call runs
a whole objective (or an evaluation); the parameters outside the blocks form the root's group. A block's weights
are gathered for its forward and backward and sharded again after them; the root's for the whole call.

Everything that leaves the learner is whole, so checkpoints and weight syncs look exactly like those of one learner
(and a run resumes under either sharding, or with another number of learners): `Shards` gathers the trainable
tensors, the EMA (kept as each rank's shard of the float32 copy) and the AdamW states, and cuts whole tensors back
into this rank's shard on load. Gathering is a collective: every rank must make the same call (`LearnerGroup`
sends it to all of them).

GRPO's frozen reference model (beta > 0) is sharded the same way (`sharded_call`): each rank holds 1/N of it, and
its one use in an update gathers it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dualrl.model.train_compile import block_stacks


def shard(root: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model`'s repeated blocks, then `root` (the module whose call contains every use of the model), over
    the default process group, one shard per rank."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for stack in block_stacks(model).values():
        for block in stack:
            fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def sharded_call(model: nn.Module, device: torch.device) -> Callable:
    """`call(fn, *args)`, which runs `fn(model, *args)`, with `model` sharded over the default process group as
    `shard` does (for a frozen model used inside an update: GRPO's reference): a rank keeps 1/N of the weights;
    a call gathers the blocks at their forwards and the rest around the call, then frees them. Every rank must
    make the same calls."""
    from dualrl.workers.data_parallel import ModelCall  # data_parallel's DDP wrapping does not need this module

    root = shard(ModelCall(model), model, device)

    def call(fn: Callable, *args):
        try:
            return root(fn, *args)
        finally:
            root.reshard()

    return call


@contextlib.contextmanager
def whole_blocks(model: nn.Module) -> Iterator[None]:
    """Inside the root's call: every block's weights gathered once and kept until the end, instead of at each of
    the block's forwards (a caption decoder calls each layer once per token)."""
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for block in blocks:
        block.unshard()
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)
            block.reshard()


def gathered(fn: Callable) -> Callable:
    """`fn(model, *args)` run with every block's weights gathered once (for no-grad calls: evaluation)."""

    def call(model: nn.Module, *args):
        with whole_blocks(model):
            return fn(model, *args)

    return call


class Shards:
    """The sharded trainable parameters of a model (after `shard`), by name: what a rank's shard of each is, and
    how a whole tensor and a shard turn into each other."""

    def __init__(self, model: nn.Module):
        self.params: dict[str, DTensor] = {
            n: p for n, p in model.named_parameters() if p.requires_grad and isinstance(p, DTensor)
        }
        self.rank = next(iter(self.params.values())).device_mesh.get_local_rank() if self.params else 0

    def local(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's shard of each tensor (DTensors to their local part; plain tensors as they are)."""
        return {n: t.to_local() if isinstance(t, DTensor) else t for n, t in tensors.items()}

    def whole(self, tensors: Mapping[str, Tensor], first_only: bool = False) -> dict[str, Tensor]:
        """Whole tensors from DTensors or from this rank's shards of the sharded parameters (a collective: every
        rank calls it with the same names in the same order). Shards of dim 0 (FSDP2's) travel together, one
        collective per dtype; other placements one tensor at a time. `first_only`: only the group's first rank
        needs them (a weight sync, a checkpoint): they are gathered to it alone, and the others get {}."""
        out, rows = {}, {}
        for name, t in tensors.items():
            if not isinstance(t, DTensor) and name in self.params:
                p = self.params[name]
                t = DTensor.from_local(
                    t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
            if isinstance(t, DTensor) and _dim0_sharded(t):
                rows[name] = t
            out[name] = t.full_tensor() if isinstance(t, DTensor) and name not in rows else t
        together: dict[tuple, list[str]] = {}  # one buffer per dtype and mesh
        for name, t in rows.items():
            together.setdefault((t.dtype, t.device_mesh), []).append(name)
        for names in together.values():
            out.update(zip(names, _gather_dim0([rows[n] for n in names], first_only)))
        if first_only and self.rank != 0:
            return {}
        return {name: out[name] for name in tensors}

    def part(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's shards of whole tensors, as plain tensors (each rank cuts its own, no communication: every
        rank holds the same whole tensors)."""
        return self.local({n: self._like(self.params.get(n), t) for n, t in tensors.items()})

    def nbytes(self, tensors: Mapping[str, Tensor]) -> int:
        """Bytes of the whole tensors that `tensors` (shards or whole) are part of."""
        return sum(self._numel(n, t) * t.element_size() for n, t in tensors.items())

    def held(self) -> int:
        """Bytes of this rank's shards of the trainable parameters, in float32 (as the EMA keeps them)."""
        return sum(p.to_local().numel() * 4 for p in self.params.values())

    def _numel(self, name: str, t: Tensor) -> int:
        return self.params[name].numel() if name in self.params and not isinstance(t, DTensor) else t.numel()

    @staticmethod
    def _like(param: DTensor | None, t: Tensor) -> Tensor:
        if param is None or isinstance(t, DTensor) or t.shape != param.shape:
            return t
        t = t.detach().to(param.device_mesh.device_type)
        return distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=None)

    # ----------------------------------------------------------------------------------- optimizer
    def whole_optimizer(self, state: dict, first_only: bool = False) -> dict:
        """An optimizer state_dict with its per-parameter tensors whole: what one learner's optimizer saves
        (`first_only`: as in `whole`; the other ranks get their state as it was)."""
        sharded = {(i, k): v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, DTensor)}
        whole = dict(zip(sharded, self.whole(dict(zip(map(str, sharded), sharded.values())), first_only).values()))
        per_param = {i: {k: whole.get((i, k), v) for k, v in s.items()} for i, s in state["state"].items()}
        return {**state, "state": per_param}

    def optimizer_part(self, state: dict, params: list[Tensor]) -> dict:
        """A whole optimizer state_dict made ready to load into the sharded optimizer over `params` (in the
        optimizer's order): each tensor shaped like its parameter becomes a DTensor sharded like it."""
        per_param = {
            i: {k: self._like(params[int(i)] if isinstance(params[int(i)], DTensor) else None, v) for k, v in s.items()}
            for i, s in state["state"].items()
        }
        return {**state, "state": per_param}

    # --------------------------------------------------------------------------------- collectives
    def any_rank(self, names: list[str], bad: list[str], device: torch.device) -> list[str]:
        """Those of `names` that any rank reports in `bad` (each rank checks its own shards): the union over the
        group, in the order of `names`."""
        bad = set(bad)
        flags = torch.tensor([n in bad for n in names], dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [n for n, b in zip(names, flags.tolist()) if b]


def _dim0_sharded(t: DTensor) -> bool:
    return t.device_mesh.ndim == 1 and len(t.placements) == 1 and t.placements[0] == Shard(0) and t.dim() > 0


def _rows_of(n: int, world: int) -> list[int]:
    """Rows of dim 0 that each rank holds when n rows are cut as torch.chunk cuts them (DTensor's Shard(0))."""
    step = -(-n // world)
    return [max(0, min(step, n - r * step)) for r in range(world)]


def _gather_dim0(tensors: list[DTensor], first_only: bool = False) -> list[Tensor]:
    """The whole values of DTensors sharded on dim 0 over one 1-D mesh, in one collective: each rank packs its
    shards into one flat buffer, every shard given the room of the largest (so all buffers are the same size).
    `first_only`: gathered to the mesh's first rank alone; the others get []."""
    mesh = tensors[0].device_mesh
    world, group = mesh.size(), mesh.get_group()
    slots = []  # (offset, row numel, rows per rank) of each tensor in a rank's buffer
    offset = 0
    for t in tensors:
        row = math.prod(t.shape[1:])  # from the shape: indexing a DTensor would communicate
        per_rank = _rows_of(t.shape[0], world)
        slots.append((offset, row, per_rank))
        offset += max(per_rank) * row
    local = tensors[0].to_local()
    buffer = torch.zeros(offset, dtype=local.dtype, device=local.device)
    for t, (start, _, _) in zip(tensors, slots):
        part = t.to_local().reshape(-1)
        buffer[start : start + part.numel()] = part
    receives = not first_only or mesh.get_local_rank() == 0
    gathered = [torch.empty_like(buffer) for _ in range(world)] if receives else None
    if first_only:
        dist.gather(buffer, gathered, dst=dist.get_global_rank(group, 0), group=group)
    else:
        dist.all_gather(gathered, buffer, group=group)
    if not receives:
        return []
    out = []
    for t, (start, row, per_rank) in zip(tensors, slots):
        pieces = [g[start : start + n * row] for g, n in zip(gathered, per_rank)]
        out.append(torch.cat(pieces).view(t.shape))
    return out


def whole_tensor(t):
    """A DTensor's whole value (a collective); any other value as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t
