"""Data parallelism for the learner: N learner processes form one torch.distributed group and each runs the
objective on its share of a step's regions; DDP averages the trainable gradients.

A step's regions are cut into `learners x optim.accumulation` micro-batches (`micro_batches`); rank r takes
micro-batches r*A .. r*A+A-1. Micro-batch k draws its randomness (Gumbel noise, point samples, reference choice)
from its own generator, derived from the step's generator and k alone, so the update does not depend on how the
micro-batches are spread over ranks: N learners with accumulation A compute what one learner with accumulation
N*A computes, up to the order of float sums. Dropout draws from each rank's own stream (seeded by rank).

The objective runs inside `ModelCall.forward`, the one call DDP wraps: the objectives call several of the
model's entry points (describe, segment, the LM), which DDP's hooks on the trainable parameters follow wherever
they are used. `runtime.learner_sharding: fsdp` shards the model over the ranks instead (`sharding.py`).
"""

from __future__ import annotations

import datetime
import inspect
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PART_SEED = 7_919  # offsets the generator seed of micro-batch k > 0 from the step's
RANK_SEED = 104_729  # offsets the dropout stream of rank r > 0 from rank 0's (the one-learner stream)


@dataclass(frozen=True)
class Rank:
    """This learner's place in the group: `index` of `world` ranks."""

    index: int = 0
    world: int = 1


def part_generator(step: torch.Generator, part: int) -> torch.Generator:
    """The generator of micro-batch `part` of a step: the step's own for part 0 (so a learner without accumulation
    draws what it always drew), a fresh one seeded from the step's seed and `part` for the others."""
    if part == 0:
        return step
    return torch.Generator(step.device).manual_seed(step.initial_seed() + PART_SEED * part)


def rank_parts(parts: Sequence, rank: Rank) -> range:
    """Indices of the micro-batches rank `rank` runs, out of all the step's."""
    each = len(parts) // rank.world
    return range(rank.index * each, (rank.index + 1) * each)


def free_address() -> str:
    """host:port where rank 0 can listen for the group's rendezvous (a port free on this node now)."""
    host = socket.gethostbyname(socket.gethostname())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return f"{host}:{s.getsockname()[1]}"


def backend(device: str, own_cards: bool) -> str:
    """NCCL when every process of a group has a card of its own; gloo otherwise (CPUs, or processes sharing a card
    through fractional GPU requests, which NCCL refuses: one rank per device)."""
    return "nccl" if device.startswith("cuda") and own_cards else "gloo"


def join(address: str, rank: Rank, backend: str, timeout_s: float, seed: int) -> None:
    """Join the learners' process group and give this rank its own dropout stream. Every collective of the group
    fails after `timeout_s` instead of waiting for a rank that stalled or died."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}",
        rank=rank.index,
        world_size=rank.world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if rank.index:
        torch.manual_seed(seed + RANK_SEED * rank.index)
        random.seed(seed + RANK_SEED * rank.index)


class ModelCall(nn.Module):
    """`call(fn, *args)` runs `fn(model, *args)` as this module's call: the one call DDP and FSDP wrap, around an
    objective (which calls several of the model's entry points) or, under FSDP, an evaluation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def data_parallel(step: ModelCall) -> nn.Module:
    """`step` wrapped in DDP over the trainable parameters; rank 0's weights are broadcast once to every rank.
    Unused-parameter search is on: an objective may leave parts of the trainable set without gradient in a
    step (no expression in a micro-batch, a branch not taken)."""
    # device_ids=None: DDP leaves the inputs where they are (the objectives upload what they need themselves)
    ddp = nn.parallel.DistributedDataParallel
    # no buffer broadcast before each forward (every rank's buffers are the same): `forward_sync_buffers` in newer
    # torch (2.14 has it), `broadcast_buffers` in older (2.11, the GPU machine's)
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(step, find_unused_parameters=True, **no_buffer_sync)


def mean_over_ranks(sums: dict[str, float], counts: dict[str, int], rank: Rank) -> dict[str, float]:
    """Each figure's mean over the micro-batches of all ranks that report it, from each rank's sums and counts
    (one gather of small dicts): what one learner reports over the same micro-batches."""
    shares = [(sums, counts)]
    if rank.world > 1:
        shares = [None] * rank.world
        dist.all_gather_object(shares, (sums, counts))
    keys = dict.fromkeys(k for s, _ in shares for k in s)
    return {k: sum(s.get(k, 0.0) for s, _ in shares) / sum(c.get(k, 0) for _, c in shares) for k in keys}


def any_rank(flag: torch.Tensor, rank: Rank) -> torch.Tensor:
    """A bool scalar true on every rank where it is true on any (an all-reduce on the device, nothing read back)."""
    if rank.world == 1:
        return flag
    value = flag.float()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value > 0
