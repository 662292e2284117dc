"""Weights from learner rank 0 to workers on the same GPU, by CUDA IPC (`runtime.weight_sync: cuda_ipc`).

Actors that share a card (fractional `runtime.worker_gpus`) cannot form an NCCL group (one rank per device), and
the object store takes the weights through the host twice. Here the learner keeps, for each kind of weights it
sends ("policy", "ema"), one flat buffer per dtype on its card and shares it once as a CUDA IPC handle
(torch.multiprocessing's reduction of a CUDA tensor). A sync:
1. the learner copies the trainable tensors into its buffers (one kernel per dtype) and waits for the copy;
2. the driver hands the handles (a few hundred bytes) to the workers;
3. each worker maps the buffers into its own process (the first time; kept for later syncs), copies its tensors
   out of them and waits for its copies before answering, so that the next sync may overwrite the buffers.
The weights never leave the card. A worker on another card or node is refused, naming the setting to use instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from dualrl.runtime.weight_channel import by_dtype, dtype_sizes, unflatten

DEVICE_ARG = 6  # position of the device index in the arguments of torch's CUDA tensor rebuild


@dataclass(frozen=True)
class SharedWeights:
    """What the driver hands to the workers: the sender's card, the buffers' layout and their IPC handles."""

    which: str  # "policy" or "ema"
    gpu: str  # the sender's card (its UUID)
    count: int  # number of tensors
    handles: dict[torch.dtype, tuple[Callable, tuple]]  # dtype -> torch's rebuild function and its arguments
    sizes: dict[torch.dtype, int]  # dtype -> elements

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty((), dtype=d).element_size() for d, n in self.sizes.items())


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class IpcSender:
    """Learner rank 0's side: persistent buffers per kind of weights, shared once."""

    def __init__(self, share: Callable[[Tensor], tuple[Callable, tuple]] = reduce_tensor):
        self._share = share
        self._buffers: dict[str, dict[torch.dtype, Tensor]] = {}
        self._handles: dict[str, dict[torch.dtype, tuple[Callable, tuple]]] = {}

    def share(self, which: str, tensors: dict[str, Tensor]) -> SharedWeights:
        sizes = dtype_sizes(tensors)
        device = next(iter(tensors.values())).device
        buffers = self._buffers.get(which)
        if buffers is None or {d: b.numel() for d, b in buffers.items()} != sizes:
            # new layout (first sync): new buffers and handles; the old ones stay mapped until the workers let go
            buffers = {d: torch.empty(n, dtype=d, device=device) for d, n in sizes.items()}
            self._buffers[which] = buffers
            self._handles[which] = {d: self._share(b) for d, b in buffers.items()}
        with torch.no_grad():
            for dtype, names in by_dtype(tensors).items():
                torch.cat([tensors[n].detach().reshape(-1) for n in names], out=buffers[dtype])
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the workers read the buffers from other processes
        uuid = gpu_uuid(device) if device.type == "cuda" else "cpu"
        return SharedWeights(which, uuid, len(tensors), self._handles[which], sizes)


class IpcReceiver:
    """A worker's side: maps the sender's buffers once and reads the weights from them at every sync."""

    def __init__(self, device: torch.device, open_handle: Callable[[str, Callable, tuple], Tensor] | None = None):
        self.device = torch.device(device)
        self._open_handle = open_handle or open_cuda
        self._mapped: dict[tuple[str, torch.dtype], tuple[tuple, Tensor]] = {}

    def receive(self, shared: SharedWeights, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Views of the sender's buffers shaped as `like` (this worker's trainable tensors, same names): copy them
        into the model, then call `done`."""
        expected = (len(like), dtype_sizes(like))
        if (shared.count, shared.sizes) != expected:
            raise RuntimeError(
                f"cuda_ipc weight sync: the learner shares {shared.count} tensors {_elements(shared.sizes)} but this "
                f"worker expects {expected[0]} tensors {_elements(expected[1])}: its model was built from another "
                "recipe"
            )
        flat = {}
        for dtype in by_dtype(like):
            key, (rebuild, args) = (shared.which, dtype), shared.handles[dtype]
            mapped = self._mapped.get(key)
            if mapped is None or mapped[0] != args:
                self._mapped[key] = mapped = (args, self._open_handle(shared.gpu, rebuild, args))
            flat[dtype] = mapped[1]
        return unflatten(flat, like)

    def done(self) -> None:
        """Wait for this worker's copies out of the shared buffers (the sender overwrites them at the next sync)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def open_cuda(uuid: str, rebuild: Callable, args: tuple) -> Tensor:
    """The tensor a CUDA IPC handle names, mapped into this process on its index of the sender's card `uuid` (Ray
    gives each actor its own CUDA_VISIBLE_DEVICES, so indices differ between processes)."""
    names = list(inspect.signature(rebuild).parameters)
    if rebuild is not rebuild_cuda_tensor or names[DEVICE_ARG] != "storage_device":
        raise RuntimeError(f"cuda_ipc weight sync: this torch ({torch.__version__}) shares CUDA tensors another way")
    seen = [gpu_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    if uuid not in seen:
        raise RuntimeError(
            f"cuda_ipc weight sync: learner 0's GPU ({uuid}) is not visible to this worker (it sees {seen}). CUDA IPC "
            "needs the workers on learner 0's card: use runtime.weight_sync=object_store, or collective with whole GPUs"
        )
    return rebuild(*args[:DEVICE_ARG], seen.index(uuid), *args[DEVICE_ARG + 1 :])


def _elements(sizes: dict[torch.dtype, Any]) -> str:
    return "(" + ", ".join(f"{str(d).removeprefix('torch.')}: {n} elements" for d, n in sizes.items()) + ")"
