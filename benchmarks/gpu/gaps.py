"""Where the GPU waits during a profiled stretch, and what the host was doing then.

`gap_report(trace)` reads a chrome trace exported by torch.profiler (CPU and CUDA activities) and finds the idle
stretches of the device between the first and the last kernel. Each idle stretch ends with a kernel (or copy); its
launch is found by correlation id, and the stretch is charged to

- the labels open on the launching thread at the launch (`record_function` ranges, innermost last, as `labelled`
  puts them around a model's methods) and the innermost operator there: which part of the step was late;
- whether the launch came after the device went idle (the host was behind) or before (the device waited on
  something else: a dependency, an event, a copy);

and the host calls that block until the device is done (`cudaStreamSynchronize` and the like) are listed with their
labels. The times are the profiler's, which slows the host: stretches that are idle under the profiler are not all
idle without it, so the shares say where the host is late, not by how much a real step is.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_RANGE_CATS = ("cpu_op", "user_annotation")
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
MIN_GAP_US = 5.0


@contextlib.contextmanager
def labelled(targets: Iterable[tuple[object, Iterable[str]]], prefix: str = "part") -> Iterator[None]:
    """`record_function` ranges named `prefix/<method>` around the given methods of the given objects, for the
    profiled stretch only (the instance attributes are removed again on exit)."""
    from torch.profiler import record_function

    wrapped: list[tuple[object, str, object]] = []  # (object, name, its own attribute before, or None)

    def wrap(fn, label):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)

        return call

    try:
        for obj, names in targets:
            for name in names:
                fn = getattr(obj, name, None)
                if not callable(fn) or isinstance(getattr(type(obj), name, None), property):
                    continue
                wrapped.append((obj, name, vars(obj).get(name)))
                setattr(obj, name, wrap(fn, f"{prefix}/{name}"))
        yield
    finally:
        for obj, name, own in reversed(wrapped):
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)


def _load(trace: Path | dict) -> list[dict]:
    data = trace if isinstance(trace, dict) else json.loads(Path(trace).read_text())
    return [e for e in data.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def _stacks_at(ranges: list[dict], times: list[float]) -> dict[float, list[dict]]:
    """For each of `times`, the host ranges of one thread that contain it, outermost first (one sweep: the ranges
    of a thread nest, so the open ones form a short stack)."""
    ranges = sorted(ranges, key=lambda r: (r["ts"], -r["dur"]))
    out, open_, i = {}, [], 0
    for t in sorted(set(times)):
        while i < len(ranges) and ranges[i]["ts"] <= t:
            r = ranges[i]
            open_ = [o for o in open_ if o["ts"] + o["dur"] >= r["ts"]]
            open_.append(r)
            i += 1
        out[t] = [o for o in open_ if o["ts"] + o["dur"] >= t]
    return out


def _place(stack: list[dict]) -> tuple[list[str], list[str]]:
    labels = [r["name"] for r in stack if r.get("cat") == "user_annotation"]
    return labels, [r["name"] for r in stack if r.get("cat") == "cpu_op"]


def _label(labels: list[str], ops: list[str]) -> str:
    """Where a launch was made: the innermost two labels (none on the autograd engine's thread), the backward
    node being run (if any), and the innermost operator."""
    backward = [o for o in ops if o.startswith("autograd::engine::evaluate_function")]
    where = " > ".join(labels[-2:]) or (backward[-1].split(": ", 1)[-1] if backward else "(no label)")
    return f"{where} | {ops[-1] if ops else '(no op)'}"


def gap_report(trace: Path | dict, top: int = 15) -> dict:
    events = _load(trace)
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    if not device:
        return {"error": "no device events in the trace (a CPU run, or the CUDA activity was not profiled)"}
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ranges: dict[tuple, list[dict]] = {}
    for e in events:
        if e.get("cat") in HOST_RANGE_CATS:
            ranges.setdefault((e["pid"], e["tid"]), []).append(e)
    start, end = device[0]["ts"], max(e["ts"] + e["dur"] for e in device)
    blocking_calls = [
        e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"].split("_v")[0] in BLOCKING
    ]
    busy_until, busy, idle = start, 0.0, []  # idle: (gap in us, the launch that ended it or None)
    for e in device:
        gap = e["ts"] - busy_until
        if gap >= MIN_GAP_US:
            idle.append((gap, busy_until, launches.get(e.get("args", {}).get("correlation"))))
        busy += max(0.0, e["ts"] + e["dur"] - max(busy_until, e["ts"]))
        busy_until = max(busy_until, e["ts"] + e["dur"])
    wanted: dict[tuple, list[float]] = {}
    for e in [launch for _, _, launch in idle if launch is not None] + blocking_calls:
        wanted.setdefault((e["pid"], e["tid"]), []).append(e["ts"])
    stacks = {key: _stacks_at(ranges.get(key, []), times) for key, times in wanted.items()}
    by_label: dict[str, list[float]] = {}
    late = early = unknown = 0.0
    for gap, idle_from, launch in idle:
        if launch is None:
            label, unknown = "(launch not in the trace)", unknown + gap
        else:
            labels, ops = _place(stacks[(launch["pid"], launch["tid"])][launch["ts"]])
            label = _label(labels, ops)
            if launch["ts"] >= idle_from:
                late += gap
            else:
                early += gap
        by_label.setdefault(label, []).append(gap)
    window = end - start
    blocking: dict[str, list[float]] = {}
    for e in blocking_calls:
        labels, ops = _place(stacks[(e["pid"], e["tid"])][e["ts"]])
        blocking.setdefault(f"{e['name']} in {(labels or ['(no label)'])[-1]} | {(ops or ['(no op)'])[-1]}", []).append(
            e["dur"]
        )
    ranked = sorted(by_label.items(), key=lambda kv: -sum(kv[1]))
    return {
        "window_ms": window / 1e3,
        "device_busy_ms": busy / 1e3,
        "device_idle_ms": (window - busy) / 1e3,
        "idle_share": (window - busy) / window if window else None,
        "gaps": len(idle),
        "idle_after_a_late_launch_ms": late / 1e3,
        "idle_with_the_launch_already_made_ms": early / 1e3,
        "idle_launch_unknown_ms": unknown / 1e3,
        "idle_by_place": [
            {"place": k, "idle_ms": sum(v) / 1e3, "gaps": len(v), "largest_ms": max(v) / 1e3} for k, v in ranked[:top]
        ],
        "idle_elsewhere_ms": sum(sum(v) for _, v in ranked[top:]) / 1e3,
        "blocking_calls": [
            {"call": k, "count": len(v), "ms": sum(v) / 1e3}
            for k, v in sorted(blocking.items(), key=lambda kv: -sum(kv[1]))
        ],
    }


def format_report(report: dict) -> str:
    if "error" in report:
        return report["error"]
    lines = [
        f"device window {report['window_ms']:.1f} ms: busy {report['device_busy_ms']:.1f} ms, idle "
        f"{report['device_idle_ms']:.1f} ms ({report['idle_share']:.0%}) in {report['gaps']} gaps of >= "
        f"{MIN_GAP_US:g} us; "
        f"idle after a late launch {report['idle_after_a_late_launch_ms']:.1f} ms, with the launch already made "
        f"{report['idle_with_the_launch_already_made_ms']:.1f} ms",
        "idle by the place of the launch that ended it (labels | innermost operator):",
    ]
    for row in report["idle_by_place"]:
        size = f"{row['idle_ms']:8.2f} ms  {row['gaps']:5d} gaps  largest {row['largest_ms']:6.2f} ms"
        lines.append(f"  {size}  {row['place']}")
    lines.append(f"  {report['idle_elsewhere_ms']:8.2f} ms  elsewhere")
    lines.append("host calls that wait for the device:")
    for row in report["blocking_calls"] or [{"call": "none", "count": 0, "ms": 0.0}]:
        lines.append(f"  {row['ms']:8.2f} ms  {row['count']:5d}x  {row['call']}")
    return "\n".join(lines)
