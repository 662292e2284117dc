"""Python's cyclic garbage collector in a training process: its pauses timed, and what the first call leaves
behind moved out of its reach (`train.gc_freeze`).

A process that has built and compiled its model keeps about a million objects the collector tracks to its end:
modules and parameters, torch.compile's graphs, guards and generated code, the tokenizer's tables. Python runs a
full (generation-2) collection whenever enough new objects have outlived two younger collections, at a step nobody
chooses, and that collection walks every tracked object: 0.6 s on a 2-core CPU after the tiny model's first compiled
update (1.09 M objects), so one step in some tens stalls for that long while the GPU waits.

`settle()` collects once and moves every survivor into the collector's permanent generation (`gc.freeze`), so
later collections walk only what was made since. The learner calls it after its first update and the rollout worker
after its first captions (where compilation happens). What was frozen stays alive to the process's
end: garbage it held has just been collected, and what a later step releases of it is freed by reference counting
as usual (only reference cycles among frozen objects would outlive their use).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> None:
    """Collect, then freeze what survives (see the module's text). A worker calls it once, after its first call;
    where two share a process the second collection walks only what the first left unfrozen."""
    t = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "gc: %d objects out of the collector's reach (%.0f ms; train.gc_freeze)",
        gc.get_freeze_count(),
        1000 * (time.perf_counter() - t),
    )


class PauseClock:
    """The time this process spends in the cyclic collector, by `gc.callbacks`: `take()` returns the seconds and
    the full collections since the last take (or since the clock was made) and starts counting again."""

    def __init__(self):
        self._start = 0.0
        self.seconds = 0.0
        self.full = 0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.full += info["generation"] == 2

    def take(self) -> tuple[float, int]:
        seconds, full = self.seconds, self.full
        self.seconds, self.full = 0.0, 0
        return seconds, full

    def close(self) -> None:
        if self._tick in gc.callbacks:
            gc.callbacks.remove(self._tick)
