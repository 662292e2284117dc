"""Weights from learner rank 0 to the rollout and reward workers over a collective (`runtime.weight_sync`).

A channel is a process group of its own (not the learners' data-parallel group): learner rank 0 as the root and
the workers that take the same weights (the rollout workers; the reward workers). It is built from a TCP store
at rank 0's address: NCCL when every member has a card of its own (the tensors go from card to card without the
host), gloo otherwise. A send
broadcasts the trainable tensors as one flat buffer per dtype, after a header that lets every receiver check it
expects the same tensors. Every collective has the deadline `runtime.collective_timeout_s`.
"""

from __future__ import annotations

import datetime
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

ROOT = 0


class WeightChannel:
    def __init__(self, address: str, rank: int, size: int, device: str, backend: str, timeout_s: float):
        host, port = address.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, int(port), size, is_master=rank == ROOT, timeout=timeout)
        self.device = torch.device(device)
        self.rank, self.size = rank, size
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, timeout)

    def send(self, tensors: dict[str, Tensor]) -> int:
        """Broadcast `tensors` (root only); returns the bytes sent."""
        flat = flatten(tensors, self.device)
        self._broadcast(layout_header(tensors, self.device))
        for buffer in flat.values():
            self._broadcast(buffer)
        return sum(b.numel() * b.element_size() for b in flat.values())

    def receive(self, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors the root sends, shaped as `like` (this worker's own trainable tensors, same names)."""
        header = layout_header(like, self.device)
        expected = header.clone()
        self._broadcast(header)
        if not torch.equal(header, expected):
            raise RuntimeError(
                f"weight channel: the learner sends {header.tolist()} (tensors, elements per dtype) but this worker "
                f"expects {expected.tolist()}: its model was built from another recipe"
            )
        flat = {dtype: torch.empty(n, dtype=dtype, device=self.device) for dtype, n in dtype_sizes(like).items()}
        for buffer in flat.values():
            self._broadcast(buffer)
        return unflatten(flat, like)

    def _broadcast(self, tensor: Tensor) -> None:
        self.group.broadcast(tensor, ROOT).wait()


def by_dtype(tensors: dict[str, Tensor]) -> dict[torch.dtype, list[str]]:
    by_dtype: dict[torch.dtype, list[str]] = defaultdict(list)
    for name in sorted(tensors):
        by_dtype[tensors[name].dtype].append(name)
    return dict(sorted(by_dtype.items(), key=lambda item: str(item[0])))


def dtype_sizes(tensors: dict[str, Tensor]) -> dict[torch.dtype, int]:
    return {dtype: sum(tensors[n].numel() for n in names) for dtype, names in by_dtype(tensors).items()}


def layout_header(tensors: dict[str, Tensor], device: torch.device) -> Tensor:
    return torch.tensor([len(tensors), *dtype_sizes(tensors).values()], dtype=torch.int64, device=device)


def flatten(tensors: dict[str, Tensor], device: torch.device) -> dict[torch.dtype, Tensor]:
    return {
        dtype: torch.cat([tensors[n].detach().reshape(-1).to(device) for n in names])
        for dtype, names in by_dtype(tensors).items()
    }


def unflatten(flat: dict[torch.dtype, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for dtype, names in by_dtype(like).items():
        pieces = flat[dtype].split([like[n].numel() for n in names])
        out.update({n: piece.view(like[n].shape) for n, piece in zip(names, pieces)})
    return out
