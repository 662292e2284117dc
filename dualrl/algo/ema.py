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
    are not rounded away, as they would be in bf16. Tensors on one device live in one flat buffer (the named
    tensors are views of it), so that `update_unless` moves them all in two kernels.

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
        params = {name: p.detach() for name, p in named_params.items()}
        self._flat: Tensor | None = None
        if params and len({p.device for p in params.values()}) == 1:
            self._flat, views = _flat_views(params.values())
            torch._foreach_copy_(views, list(params.values()))
            self._shadow = dict(zip(params, views))
        else:  # tensors on several devices: one copy each (update_unless needs one device)
            self._shadow = {name: p.to(torch.float32, copy=True) for name, p in params.items()}
        self._staging: tuple[Tensor, list[Tensor], Tensor] | None = None  # update_unless's copy of the parameters

    @torch.no_grad()
    def update(self, named_params: Mapping[str, Tensor]) -> None:
        """``ema <- lerp(ema, param, 1 - decay)`` for every name, in place, as one foreach call."""
        _check_names(self._shadow, named_params, "EMA.update")
        if not self._shadow or self.decay == 1.0:  # frozen: nothing moves
            return
        names = list(self._shadow)
        shadow = [self._shadow[n] for n in names]
        # lerp_ needs matching dtype/device; bf16 params are upcast to the float32 copy (no call where they match:
        # hundreds of tensors a step, each call a trip through the dispatcher)
        params = [named_params[n] for n in names]
        params = [p if (p.dtype, p.device) == (s.dtype, s.device) else p.to(s) for p, s in zip(params, shadow)]
        # torch.lerp uses end - (end - start) * (1 - w) for w >= 0.5, so decay = 0 copies exactly.
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def update_unless(self, named_params: Mapping[str, Tensor], bad: Tensor) -> Tensor:
        """`update`, decided on the device: nothing moves where `bad` (a bool scalar) is true or where any
        parameter's L2 norm is not finite (a NaN or inf, or values so large that the norm overflows: about 1e19 in
        float32), and nothing is read back. Returns one bool per tensor, on the EMA's device: whether its norm is
        finite. The parameters are copied into a float32 staging buffer (made once, the size of the EMA); the rest
        is a few kernels on it: the sums of squares per tensor, a select (NaN and inf never reach the EMA), a lerp
        with lerp's own values."""
        _check_names(self._shadow, named_params, "EMA.update_unless")
        if self._flat is None:
            raise ValueError("EMA.update_unless needs every tensor on one device")
        if self._staging is None:
            flat, views = _flat_views(self._shadow.values())
            lengths = torch.tensor([v.numel() for v in views], dtype=torch.int64, device=flat.device)
            self._staging = (flat, views, lengths)
        flat, views, lengths = self._staging
        torch._foreach_copy_(views, [named_params[n] for n in self._shadow])  # casts bf16 parameters up
        squares = torch.segment_reduce(flat.square(), "sum", lengths=lengths, unsafe=True)  # unsafe: no host check
        finite = torch.isfinite(squares)
        if self.decay < 1.0:  # frozen: nothing moves, the check still answers
            keep = ~bad & finite.all()
            torch.where(keep, flat, self._flat, out=flat)
            self._flat.lerp_(flat, 1.0 - self.decay)  # lerp(ema, ema, w) is ema exactly
        return finite

    def tensors(self) -> dict[str, Tensor]:
        """The live float32 EMA tensors by name (not copies)."""
        return dict(self._shadow)

    def state_dict(self) -> dict[str, Tensor]:
        """Checkpoint state: name -> float32 EMA tensor, each a copy of its own (views of the flat buffer would
        each carry the whole buffer when pickled, and safetensors refuses tensors that share memory)."""
        return {name: t.clone() for name, t in self._shadow.items()}

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


def _flat_views(tensors: Iterable[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One float32 buffer on the device of the tensors, and a view of it shaped as each."""
    tensors = list(tensors)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device)
    views = flat.split([t.numel() for t in tensors])
    return flat, [v.view(t.shape) for v, t in zip(views, tensors)]
