"""benchmarks/gpu/gaps.py, which docs/speed.md's account of a 4B update's idle GPU comes from: on a hand-made trace
it finds each idle stretch, charges it to the labels and operator open at the launch that ended it, tells late
launches from early ones, and lists the host calls that wait for the device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# loaded from its file: benchmarks/gpu is not a package, and its folder on sys.path would shadow other modules
_spec = importlib.util.spec_from_file_location("gaps", Path(__file__).resolve().parents[1] / "benchmarks/gpu/gaps.py")
gaps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gaps)
format_report, gap_report, labelled = gaps.format_report, gaps.gap_report, gaps.labelled

HOST, DEV = {"pid": 1, "tid": 1}, {"pid": 0, "tid": 7}


def _x(cat: str, name: str, ts: float, dur: float, where: dict, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **where, "args": args}


def test_idle_stretches_are_charged_to_the_place_of_the_launch_that_ended_them():
    events = [
        _x("user_annotation", "update/lm_hidden", 0, 100, HOST),
        _x("cpu_op", "aten::mm", 1, 2, HOST),
        _x("cuda_runtime", "cudaLaunchKernel", 2, 1, HOST, correlation=1),
        _x("kernel", "k1", 5, 10, DEV, correlation=1),  # busy 5-15
        _x("cpu_op", "aten::add", 40, 2, HOST),
        _x("cuda_runtime", "cudaLaunchKernel", 41, 1, HOST, correlation=2),  # launched after the device went idle
        _x("kernel", "k2", 45, 10, DEV, correlation=2),  # idle 15-45: 30 us, late
        _x("cpu_op", "aten::cat", 50, 2, HOST),
        _x("cuda_runtime", "cudaLaunchKernel", 50.5, 1, HOST, correlation=3),  # launched while k2 still ran
        _x("kernel", "k3", 65, 5, DEV, correlation=3),  # idle 55-65: 10 us, the launch already made
        _x("cuda_runtime", "cudaStreamSynchronize", 80, 7, HOST),
    ]
    report = gap_report({"traceEvents": events})
    us = lambda ms: pytest.approx(ms / 1e3)  # noqa: E731  the report is in ms, the trace in us
    assert report["window_ms"] == us(65) and report["device_busy_ms"] == us(25) and report["gaps"] == 2
    assert report["idle_after_a_late_launch_ms"] == us(30)
    assert report["idle_with_the_launch_already_made_ms"] == us(10)
    places = {row["place"]: row["idle_ms"] for row in report["idle_by_place"]}
    assert places == {"update/lm_hidden | aten::add": us(30), "update/lm_hidden | aten::cat": us(10)}
    assert report["blocking_calls"] == [
        {"call": "cudaStreamSynchronize in update/lm_hidden | (no op)", "count": 1, "ms": 0.007}
    ]
    text = format_report(report)
    assert "    0.03 ms      1 gaps" in text and "update/lm_hidden | aten::add" in text


def test_a_trace_without_device_events_says_so():
    report = gap_report({"traceEvents": [_x("cpu_op", "aten::mm", 0, 5, HOST)]})
    assert "no device events" in report["error"] and format_report(report) == report["error"]


def test_labelled_wraps_methods_and_attributes_for_the_stretch_only():
    class Model:
        def __init__(self):
            self.terms = lambda x: x + 1

        def forward(self, x):
            return 2 * x

        @property
        def size(self):
            return 3

    model = Model()
    own = model.terms
    with labelled([(model, ("forward", "terms", "size", "missing"))], "update"):
        assert model.forward(2) == 4 and model.terms(2) == 3 and model.size == 3
        assert "forward" in vars(model) and model.terms is not own
    assert "forward" not in vars(model) and model.terms is own
