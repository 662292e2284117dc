"""Host-to-device copies that do not make the host wait.

A copy from pageable host memory to a GPU blocks the host until the device has finished everything queued before
it, so a training step full of small uploads (indices, random draws, masks) keeps the host from running ahead of the
device. `upload` stages a host tensor in pinned memory and copies it asynchronously; tensors already on the target
device, and every copy that does not go from the host to a GPU, stay plain `.to` calls. `rand` makes a step's random
draws on the device it computes on, reproducible from the step's host generator, so none has to be copied.
"""

from __future__ import annotations

import torch
from torch import Tensor


def upload(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` on `device`; from host memory to a GPU through pinned memory, without a host wait."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def rand(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Float32 uniform draws in [0, 1) on `device`, reproducible from `generator`. Where the generator lives on
    `device`'s kind (a CPU run) they come from it directly. A host generator serving a GPU seeds a generator there with
    one draw: the host neither makes the draws (megabytes of them for a batch of point samples or clicks) nor copies
    them, and the same generator state gives the same draws on the same kind of device."""
    device = torch.device(device)
    if generator is None:
        return torch.rand(shape, device=device)
    if generator.device.type == "cpu" and device.type != "cpu":
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return torch.rand(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    return upload(torch.rand(shape, generator=generator, device=generator.device), device)
