"""Which ways of waiting for the GPU let another Python thread run (release the interpreter lock) while they wait.

    python benchmarks/gpu/gil_waits.py [--ms 200] [--out gil_waits.json]

For each kind of wait, the GPU is given about `--ms` of matrix products, then the main thread waits for them in
that way while a second thread counts in pure Python. The count during the wait, against the count in the same
time with the main thread asleep (which releases the lock), says how much of the wait other Python threads could
use (a loader's receiving thread, say): near 1, the wait releases the lock; near 0, it holds it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch


def gpu_work(ms: float, a: torch.Tensor) -> None:
    """About `ms` of matrix products queued on the current stream (calibrated by `calibrate`)."""
    for _ in range(gpu_work.reps):
        a = a @ a
        a = a / a.norm()
    gpu_work.last = a


def calibrate(ms: float, a: torch.Tensor) -> None:
    gpu_work.reps = 1
    gpu_work(ms, a)  # cuBLAS's start-up, untimed
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        gpu_work(ms, a)
    torch.cuda.synchronize()
    one = (time.perf_counter() - t) / 20
    gpu_work.reps = max(1, round(ms / 1000 / one))


class Counter(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.count, self.running, self.done = 0, threading.Event(), False

    def run(self):
        while not self.done:
            if self.running.is_set():
                self.count += 1
            else:
                time.sleep(0.0005)


def measure(name: str, wait, ms: float, a: torch.Tensor, counter: Counter) -> dict:
    torch.cuda.synchronize()
    gpu_work(ms, a)
    counter.count = 0
    counter.running.set()
    t = time.perf_counter()
    wait()
    elapsed = time.perf_counter() - t
    counter.running.clear()
    return {"wait": name, "elapsed_ms": 1000 * elapsed, "counts_per_ms": counter.count / (1000 * elapsed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    a = torch.randn(4096, 4096, device="cuda")
    calibrate(args.ms, a)
    counter = Counter()
    counter.start()
    pinned = torch.empty(8, pin_memory=True)

    def pinned_event():
        figures = gpu_work.last[0, :8]
        pinned.copy_(figures, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        return pinned.tolist()

    waits = {
        "asleep (reference)": lambda: time.sleep(args.ms / 1000),
        "tensor.tolist()": lambda: gpu_work.last[0, :8].tolist(),
        "tensor.item()": lambda: gpu_work.last[0, 0].item(),
        "torch.cuda.synchronize()": torch.cuda.synchronize,
        "copy to pinned, event.synchronize()": pinned_event,
        "tensor.cpu()": lambda: gpu_work.last[0, :8].cpu(),
    }
    rows = []
    for _ in range(2):
        for name, wait in waits.items():
            rows.append(measure(name, wait, args.ms, a, counter))
    counter.done = True
    reference = max(r["counts_per_ms"] for r in rows if r["wait"].startswith("asleep"))
    for r in rows:
        r["other_thread_share"] = r["counts_per_ms"] / reference
        print(f"{r['wait']:38s} {r['elapsed_ms']:7.1f} ms   other thread ran {r['other_thread_share']:.2f}", flush=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
