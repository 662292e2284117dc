"""Host-to-device copies that do not make the host wait.

A copy from pageable host memory to a GPU blocks the host until the device has finished everything queued before
it, so a training step full of small uploads (indices, random draws, masks) keeps the host from running ahead of the
device. `upload` stages a host tensor in pinned memory and copies it asynchronously; tensors already on the target
device, and every copy that does not go from the host to a GPU, stay plain `.to` calls.
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
