"""Finding reward plugins and running them together.

Recipe entries (see `RewardSpec` in `dualrl.recipe`)::

    rewards:
      - {name: mask_iou, weight: 1.0}                       # built-in, by name
      - {name: meteor, weight: 0.5, workers: 2}             # built-in with options
      - {name: my_pkg.rewards:brevity, weight: 0.1}         # importable module:attr
      - {path: my_rewards.py, name: brevity, max_words: 12}  # a function or class in a file

`resolve_plugin` finds the target and checks the options against its signature (at recipe load, before any
model is built); `RewardSet` builds the plugins and scores a batch with all of them: async plugins
concurrently on one event loop, sync ones in threads, each under its own timeout. Per caption the weighted
total sums the plugins that gave a score; `None` ("not applicable") and failures are left out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import importlib.util
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewards.base import RewardInput, RewardOutput

log = logging.getLogger(__name__)

BUILTINS = {
    "mask_iou": "rewards.mask_iou:MaskIoU",
    "meteor": "rewards.meteor:Meteor",
    "llm_judge": "rewards.llm_judge:LLMJudge",
    "length": "rewards.shaping:length",
    "repetition": "rewards.shaping:repetition",
}


class RewardConfigError(ValueError):
    """A reward entry that cannot be loaded or does not take its options."""


# ------------------------------------------------------------------------------------------- finding
def _import_attr(module_name: str, attr: str, what: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardConfigError(f"cannot import {module_name!r} for {what}: {err}") from None
    if not hasattr(module, attr):
        raise RewardConfigError(f"{module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _from_file(path: str, attr: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise RewardConfigError(f"path: file not found: {path!r}")
    module_name = f"dualrl_user_reward_{abs(hash(str(file.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise RewardConfigError(f"{path!r} failed to import: {type(err).__name__}: {err}") from None
        sys.modules[module_name] = module
    if not hasattr(module, attr):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise RewardConfigError(f"{path!r} has no {attr!r}; callables there: {found}")
    return getattr(module, attr)


def find_target(spec) -> Any:
    """The function or class a reward entry names."""
    if spec.path is not None:
        return _from_file(spec.path, spec.name)
    if ":" in spec.name:
        module_name, _, attr = spec.name.partition(":")
        return _import_attr(module_name, attr, spec.name)
    if spec.name in BUILTINS:
        module_name, _, attr = BUILTINS[spec.name].partition(":")
        return _import_attr(module_name, attr, spec.name)
    raise RewardConfigError(
        f"unknown reward {spec.name!r}; built-ins: {sorted(BUILTINS)}, or give "
        "`module:attr`, or `path: file.py` with `name: function`"
    )


def _check_options(target: Any, options: dict[str, Any]) -> None:
    """The options must bind to the constructor (a class) or to the keyword arguments after the batch."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    if not inspect.isclass(target):
        params = params[1:]  # the batch
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise RewardConfigError(f"unknown option(s) {unknown}; allowed: {allowed}")
    missing = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in options
    ]
    if missing:
        raise RewardConfigError(f"required option(s) missing: {missing}")


def resolve_plugin(spec) -> Any:
    target = find_target(spec)
    if not callable(target):
        raise RewardConfigError(f"{spec.name!r} is not callable")
    _check_options(target, spec.options)
    return target


def _is_async(fn: Callable) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    call = type(fn).__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else None
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


# ------------------------------------------------------------------------------------------- running
@dataclass
class RewardResult:
    """Scores of one batch: the weighted total per caption, every plugin's own scores, and the metrics."""

    total: torch.Tensor
    scores: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)
    segmentation: dict[str, torch.Tensor] | None = None  # the EMA segmenter's IoUs and logits, when it ran


@dataclass
class _Plugin:
    key: str
    weight: float
    timeout_s: float
    fn: Callable
    is_async: bool


def _clean(out: Any, n: int) -> RewardOutput:
    """A plugin's answer as a RewardOutput of n scores; non-finite values become failures."""
    if not isinstance(out, RewardOutput):
        out = RewardOutput(scores=out.tolist() if hasattr(out, "tolist") else list(out))
    if len(out.scores) != n:
        raise ValueError(f"returned {len(out.scores)} scores for {n} captions")
    scores, bad = [], 0
    for s in out.scores:
        if s is None:
            scores.append(None)
            continue
        value = float(s)
        if math.isfinite(value):
            scores.append(value)
        else:
            scores.append(None)
            bad += 1
    return RewardOutput(scores, out.failures + bad, dict(out.metrics))


class RewardSet:
    """The recipe's reward plugins, built once, scoring every step's captions."""

    def __init__(self, specs):
        self.plugins: list[_Plugin] = []
        for spec in specs:
            target = resolve_plugin(spec)
            fn = target(**spec.options) if inspect.isclass(target) else functools.partial(target, **spec.options)
            self.plugins.append(_Plugin(spec.key, spec.weight, spec.timeout_s, fn, _is_async(fn)))
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, len(self.plugins)), thread_name_prefix="reward"
        )
        self.failures = {p.key: 0 for p in self.plugins}  # captions left unscored by failures, whole run
        self._warned: set[tuple[str, str]] = set()

    def __call__(self, batch: RewardInput) -> RewardResult:
        outcomes = asyncio.run(self._all(batch))
        n = len(batch)
        total = torch.zeros(n, dtype=torch.float64)
        scored = torch.zeros(n, dtype=torch.bool)
        scores, metrics = {}, {}
        for plugin, (out, seconds) in zip(self.plugins, outcomes):
            scores[plugin.key] = out.scores
            self.failures[plugin.key] += out.failures
            metrics.update(_plugin_metrics(plugin.key, out, seconds))
            for i, s in enumerate(out.scores):
                if s is not None:
                    total[i] += plugin.weight * s
                    scored[i] = True
        if n:
            metrics["reward/total"] = total.mean().item()
            metrics["reward/total/std"] = total.std().item() if n > 1 else 0.0
            metrics["reward/unscored"] = float((~scored).sum())
        return RewardResult(total.float(), scores, metrics)

    async def _all(self, batch: RewardInput) -> list[tuple[RewardOutput, float]]:
        return list(await asyncio.gather(*(self._one(p, batch) for p in self.plugins)))

    async def _one(self, plugin: _Plugin, batch: RewardInput) -> tuple[RewardOutput, float]:
        t0 = time.perf_counter()
        try:
            if plugin.is_async:
                raw = await asyncio.wait_for(plugin.fn(batch), plugin.timeout_s)
            else:
                loop = asyncio.get_running_loop()
                raw = await asyncio.wait_for(loop.run_in_executor(self._threads, plugin.fn, batch), plugin.timeout_s)
            out = _clean(raw, len(batch))
        except Exception as err:  # a plugin never ends the run: counted, logged, scored None
            reason = "timeout" if isinstance(err, (asyncio.TimeoutError, TimeoutError)) else type(err).__name__
            self._warn(plugin.key, reason, f"timed out after {plugin.timeout_s} s" if reason == "timeout" else str(err))
            out = RewardOutput([None] * len(batch), failures=len(batch))
        return out, time.perf_counter() - t0

    def _warn(self, key: str, reason: str, message: str) -> None:
        level = logging.DEBUG if (key, reason) in self._warned else logging.WARNING
        self._warned.add((key, reason))
        log.log(
            level,
            "reward %s failed this step (%s): %s; its captions are unscored (counted in reward/%s/failures)",
            key,
            reason,
            message,
            key,
        )

    def close(self) -> None:
        for plugin in self.plugins:
            close = getattr(plugin.fn, "close", None)
            if callable(close):
                close()
        self._threads.shutdown(wait=False, cancel_futures=True)


def _plugin_metrics(key: str, out: RewardOutput, seconds: float) -> dict[str, float]:
    values = [s for s in out.scores if s is not None]
    metrics = {f"reward/{key}/failures": float(out.failures), f"reward/{key}/ms": 1000 * seconds}
    if values:
        t = torch.tensor(values, dtype=torch.float64)
        metrics[f"reward/{key}"] = t.mean().item()
        metrics[f"reward/{key}/std"] = t.std().item() if len(values) > 1 else 0.0
    metrics.update({f"reward/{key}/{k}": float(v) for k, v in out.metrics.items()})
    return metrics
