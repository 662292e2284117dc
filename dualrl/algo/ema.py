"""Exponential moving average of named tensors (the dual loop's teacher weights)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def _check_names(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    """Raise a KeyError naming every missing and unexpected tensor name."""
    expected, got = set(expected), set(got)
    if expected != got:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise KeyError(f"{what}: names do not match the EMA; missing={missing}, unexpected={unexpected}")


class EMA:
    """Float32 exponential moving average of a fixed set of named tensors.

    After each optimiser step ``update`` applies, per tensor,

        ema <- decay * ema + (1 - decay) * param  =  lerp(ema, param, 1 - decay)

    The copy is kept in float32 so that small ``(1 - decay)`` increments (1e-3 at the dual loop's 0.999)
    are not rounded away, as they would be in bf16.

    Args:
        named_params: name -> tensor, usually the model's trainable parameters
            (``{n: p for n, p in model.named_parameters() if p.requires_grad}``).
        decay: in [0, 1]; 0 copies the parameters at every update, 1 keeps the starting tensors (a frozen
            teacher, as a fixed reward model is in RLHF).
    """

    def __init__(self, named_params: Mapping[str, Tensor], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self._shadow: dict[str, Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in named_params.items()
        }
        self._staging: tuple[Tensor, list[Tensor]] | None = None  # update(keep=...)'s copy of the parameters

    @torch.no_grad()
    def update(self, named_params: Mapping[str, Tensor], keep: Tensor | None = None) -> None:
        """``ema <- lerp(ema, param, 1 - decay)`` for every name, in place, as one foreach call.

        `keep`: a bool scalar on the EMA's device; where it is false nothing moves, even when the parameters hold
        NaN or inf (a bad update's weights), and the host never reads it. Then the update runs as
        ``ema <- ema * (1 - w * keep) + w * where(keep, param, 0)`` with ``w = 1 - decay`` (lerp's value up to
        rounding; decay 0 still copies exactly), through a float32 staging copy of the parameters made once."""
        _check_names(self._shadow, named_params, "EMA.update")
        if not self._shadow or self.decay == 1.0:  # frozen: nothing moves
            return
        names = list(self._shadow)
        shadow = [self._shadow[n] for n in names]
        params = [named_params[n] for n in names]
        if keep is not None:
            self._update_where(shadow, params, keep)
            return
        # lerp_ needs matching dtype/device; bf16 params are upcast to the float32 copy (no call where they match:
        # hundreds of tensors a step, each call a trip through the dispatcher)
        params = [p if (p.dtype, p.device) == (s.dtype, s.device) else p.to(s) for p, s in zip(params, shadow)]
        # torch.lerp uses end - (end - start) * (1 - w) for w >= 0.5, so decay = 0 copies exactly.
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

    def _update_where(self, shadow: list[Tensor], params: list[Tensor], keep: Tensor) -> None:
        if self._staging is None:  # one flat float32 buffer, viewed as each parameter
            if len({s.device for s in shadow}) > 1:
                raise ValueError("EMA.update(keep=...) needs every tensor on one device")
            flat = torch.empty(sum(s.numel() for s in shadow), dtype=torch.float32, device=shadow[0].device)
            views = flat.split([s.numel() for s in shadow])
            self._staging = (flat, [v.view_as(s) for v, s in zip(views, shadow)])
        flat, staged = self._staging
        w = 1.0 - self.decay
        torch._foreach_copy_(staged, params)  # casts bf16 parameters up
        flat.masked_fill_(~keep, 0.0)  # a select: NaN and inf are gone where keep is false
        torch._foreach_mul_(shadow, 1.0 - w * keep.float())
        torch._foreach_add_(shadow, staged, alpha=w)

    def tensors(self) -> dict[str, Tensor]:
        """The live float32 EMA tensors by name (not copies)."""
        return dict(self._shadow)

    def state_dict(self) -> dict[str, Tensor]:
        """Checkpoint state: name -> float32 EMA tensor (detached references, like ``nn.Module``)."""
        return dict(self._shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy a ``state_dict`` into the EMA in place; names and shapes must match exactly."""
        _check_names(self._shadow, state, "EMA.load_state_dict")
        for name, value in state.items():
            if value.shape != self._shadow[name].shape:
                raise ValueError(
                    f"EMA.load_state_dict: shape mismatch for {name!r}: "
                    f"{tuple(value.shape)} in state vs {tuple(self._shadow[name].shape)} in EMA"
                )
        for name, value in state.items():
            self._shadow[name].copy_(value)
