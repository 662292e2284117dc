"""The learner's ledger of updates: what each optimizer update reported, kept on the device until it is read.

An update is bad when its loss or gradient norm is not finite (the update is skipped) or when it leaves a trainable
tensor non-finite (the EMA does not take it). Where the learner decides this on the device (`Learner` on a GPU:
the fused optimizer skips on a device flag, the EMA is gated by one), nothing in an update waits for the GPU; each
update appends one small tensor here (its figures, its flag, one finiteness flag per trainable tensor), and
`settle` reads all of those since the last read in one transfer and does the bookkeeping in their order: counts,
the run of bad steps, and the reports, exactly as if each update had been read when it ran; the longest run of bad
steps since the last read is kept too, since one that ended before the read must still stop the run. Where the learner
decides on the host (a CPU, sharded weights), it settles after every step, and the ledger is the same bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger("dualrl.workers.learner")  # the learner's bad updates, under the learner's name


@dataclass
class Update:
    """One optimizer update as the host knows it after a read."""

    step: int  # the driver's step it belongs to
    loss: float  # its loss (the mean over this rank's micro-batches)
    grad_norm: float  # the whole gradient's norm before clipping
    figures: dict[str, float]  # sums over this rank's micro-batches of the objective's figures (the loss's too)
    counts: dict[str, int]  # how many micro-batches reported each figure


@dataclass
class _Pending:
    step: int
    values: Tensor  # float32 [3 + len(names) + tensors]: loss, grad norm, bad, figures, each tensor finite (1/0)
    names: list[str]  # the figures read from `values`, in order
    host: dict[str, float]  # the figures that were host numbers already
    counts: dict[str, int]


class Ledger:
    """Updates since the last read, and the counts kept over the run."""

    def __init__(self, tensor_names: list[str]):
        self.tensor_names = tensor_names  # the trainable tensors, in the order of the finiteness flags
        self.skipped = 0  # bad updates over the run (saved with checkpoints)
        self.in_a_row = 0  # driver steps in a row with a bad update, up to the last settled one
        self.reports: list[str] = []  # what went wrong in the bad updates of that run of bad steps
        # the longest run of bad steps settled since `new_window` (one that ended before a read still counts:
        # the driver stops on it), and its reports
        self.longest, self.longest_reports = 0, []
        self._pending: list[_Pending] = []

    def new_window(self) -> None:
        """Start counting the longest run of bad steps afresh (after a read has reported it)."""
        self.longest, self.longest_reports = 0, []

    def add(
        self,
        step: int,
        loss: Tensor,
        grad_norm: Tensor,
        bad: Tensor,
        finite: Tensor,
        sums: dict[str, Tensor | float],
        counts: dict[str, int],
    ) -> None:
        """Queue an update's figures (device tensors, not read): `bad` a bool scalar, `finite` one bool per tensor."""
        names = [k for k, v in sums.items() if isinstance(v, Tensor)]
        device = loss.device
        values = torch.cat(
            [
                torch.stack([loss.float(), grad_norm.float().to(device), bad.float().to(device)]),
                *([torch.stack([sums[k].detach().float().to(device) for k in names])] if names else []),
                finite.float().to(device),
            ]
        )
        host = {k: float(v) for k, v in sums.items() if not isinstance(v, Tensor)}
        self._pending.append(_Pending(step, values, names, host, dict(counts)))

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def settle(self) -> list[Update]:
        """Read every queued update (one transfer), count and report the bad ones step by step, and return the
        updates of the last step read (empty when nothing was queued)."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        flat = torch.cat([p.values for p in pending]).tolist()
        updates, at, last_step = [], 0, None
        bad_in_step = False
        for p in pending:
            values = flat[at : at + len(p.values)]
            at += len(p.values)
            if p.step != last_step:
                if last_step is not None:
                    self._end_step(bad_in_step)
                last_step, bad_in_step, updates = p.step, False, []
            loss, grad_norm, bad = values[0], values[1], values[2] != 0.0
            figures = dict(zip(p.names, values[3 : 3 + len(p.names)]))
            finite = values[3 + len(p.names) :]
            figures.update(p.host)
            updates.append(Update(p.step, loss, grad_norm, figures, p.counts))
            if bad:
                self._bad(f"step {p.step}: loss={loss}, grad_norm={grad_norm}, update skipped")
            elif not all(finite):
                broken = [n for n, ok in zip(self.tensor_names, finite) if not ok]
                self._bad(
                    f"step {p.step}: the update (loss={loss:.4g}, grad_norm={grad_norm:.4g}) left non-finite weights "
                    f"in {_names(broken)}, EMA not updated"
                )
            bad_in_step = bad_in_step or bad or not all(finite)
        self._end_step(bad_in_step)
        return updates

    def _bad(self, what: str) -> None:
        self.skipped += 1
        self.reports.append(what)
        log.warning("%s (%d skipped or non-finite so far)", what, self.skipped)

    def _end_step(self, bad: bool) -> None:
        if bad:
            self.in_a_row += 1
            if self.in_a_row > self.longest:
                self.longest, self.longest_reports = self.in_a_row, list(self.reports)
        else:
            self.in_a_row = 0
            self.reports.clear()


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
