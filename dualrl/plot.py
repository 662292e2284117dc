"""`python -m dualrl.plot RUN [RUN ...]` — the evaluation curves of several runs on one figure, seeds as bands.

Each RUN is a training run's output_dir (its `metrics.jsonl`). Runs whose directory names differ only by a trailing
seed (`sft_dual_seed0`, `sft_dual_seed1`, ... or `-s0`, `_s1`) form one arm: its curve is the mean over seeds at
each evaluated step, its band the mean ± one standard deviation (min and max with two seeds or fewer shown as
the band too). `--arm NAME=RUN[,RUN...]` names an arm explicitly instead.

    python -m dualrl.plot outputs/compare/sft_dual_seed* outputs/compare/supervised_seed* --out compare.png

Prints, and writes with `--json`, each arm's final figures: mean ± std over its runs of each run's last evaluation
of every plotted metric (runs matched on wall time may end at different steps; the table says where). A
torn last line of a `metrics.jsonl` (a run killed mid-write) is skipped with a warning; a run without evaluations,
a missing directory or arms whose seeds never share an evaluated step stop the command with an error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

DEFAULT_METRICS = ("eval/cycle_miou", "eval/ref_miou", "eval/meteor", "eval/reward_total")
_SEED_SUFFIX = re.compile(r"[-_](?:seed|s)\d+$")


class PlotError(ValueError):
    """A bad input: printed as one `error:` line, exit 2."""


def read_evals(run: Path) -> dict[int, dict[str, float]]:
    """Step -> the evaluation metrics logged at that step (keys starting `eval/`, finite values only)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (not a dualrl run's output_dir?)")
    evals: dict[int, dict[str, float]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed while writing its last line
                print(f"warning: {path}: torn last line skipped", file=sys.stderr)
                continue
            raise PlotError(f"{path}:{number}: not a JSON line") from None
        logged = {k: v for k, v in record.items() if k.startswith("eval/")}
        values = {k: v for k, v in logged.items() if _finite(v)}
        if len(values) < len(logged):  # a NaN/inf evaluation is not a measurement: left out, and said so
            bad = sorted(set(logged) - set(values))
            print(f"warning: {path}:{number}: non-finite {', '.join(bad)} left out", file=sys.stderr)
        if values and "step" in record:
            evals.setdefault(int(record["step"]), {}).update(values)
    if not evals:
        raise PlotError(f"{path}: no evaluation logged yet")
    return evals


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def arm_name(run: Path) -> str:
    return _SEED_SUFFIX.sub("", run.resolve().name)


def group_runs(runs: list[Path], named: list[str]) -> OrderedDict[str, list[Path]]:
    """Arms in the order first seen: named ones (`NAME=RUN,RUN`), then runs grouped by seedless directory name."""
    arms: OrderedDict[str, list[Path]] = OrderedDict()
    for spec in named:
        name, sep, members = spec.partition("=")
        if not sep or not name or not members:
            raise PlotError(f"--arm {spec!r}: expected NAME=RUN[,RUN...]")
        arms.setdefault(name, []).extend(Path(m) for m in members.split(","))
    for run in runs:
        arms.setdefault(arm_name(run), []).append(run)
    for name, members in arms.items():
        for run in members:
            if not run.is_dir():
                raise PlotError(f"arm {name}: {run} is not a directory")
    return arms


def summarise(
    evals: list[dict[int, dict[str, float]]], metric: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed evaluated `metric` at, with the mean and the band's low and high at each."""
    steps = sorted(set.intersection(*({s for s, v in e.items() if metric in v} for e in evals)))
    means, lows, highs = [], [], []
    for step in steps:
        values = [e[step][metric] for e in evals]
        mean = statistics.fmean(values)
        if len(values) > 2:
            spread = statistics.stdev(values)
            low, high = mean - spread, mean + spread
        else:
            low, high = min(values), max(values)
        means.append(mean)
        lows.append(low)
        highs.append(high)
    return steps, means, lows, highs


def final_table(arms: OrderedDict[str, list[Path]], evals: dict[str, list], metrics: list[str]) -> dict:
    """Per arm: seeds, and for each metric the mean / std / values of every run's last evaluation of it (runs of
    one arm may end at different steps, e.g. when matched on wall time: `steps` lists where)."""
    table = {}
    for name in arms:
        row = {"runs": [str(r) for r in arms[name]], "seeds": len(arms[name]), "metrics": {}}
        for metric in metrics:
            lasts = [max((s for s, v in e.items() if metric in v), default=None) for e in evals[name]]
            if None in lasts:
                continue
            values = [e[step][metric] for e, step in zip(evals[name], lasts)]
            row["metrics"][metric] = {
                "steps": lasts,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        table[name] = row
    return table


def _at(steps: list[int]) -> str:
    return f"@{steps[0]}" if min(steps) == max(steps) else f"@{min(steps)}-{max(steps)}"


def draw(arms: OrderedDict[str, list[Path]], evals: dict[str, list], metrics: list[str], out: Path, title: str | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for color, name in enumerate(arms):
            steps, means, lows, highs = summarise(evals[name], metric)
            if not steps:
                continue
            label = f"{name} ({len(arms[name])} seed{'s' if len(arms[name]) > 1 else ''})"
            ax.plot(steps, means, marker="o", markersize=3, color=f"C{color}", label=label)
            if len(arms[name]) > 1:
                ax.fill_between(steps, lows, highs, color=f"C{color}", alpha=0.2, linewidth=0)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualrl.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run output_dirs; trailing _seedN / _sN names group seeds")
    parser.add_argument("--arm", action="append", default=[], help="NAME=RUN[,RUN...]: an arm named explicitly")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path, default=Path("dualrl_plot.png"), help="figure file (PNG, SVG, PDF)")
    parser.add_argument("--json", type=Path, default=None, help="write the final-evaluation table here too")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        if not args.runs and not args.arm:
            raise PlotError("no runs given")
        arms = group_runs(args.runs, args.arm)
        evals = {name: [read_evals(run) for run in members] for name, members in arms.items()}
        for name, per_run in evals.items():
            if not any(summarise(per_run, m)[0] for m in args.metrics):
                raise PlotError(f"arm {name}: its runs share no evaluated step of {', '.join(args.metrics)}")
        draw(arms, evals, args.metrics, args.out, args.title)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = final_table(arms, evals, args.metrics)
    width = max(len(n) for n in table)
    print(f"{'arm':{width}s}  seeds  " + "  ".join(f"{m:>26s}" for m in args.metrics))
    for name, row in table.items():
        cells = []
        for metric in args.metrics:
            cell = row["metrics"].get(metric)
            cells.append(f"{cell['mean']:.4f} ± {cell['std']:.4f} {_at(cell['steps'])}" if cell else "—")
        print(f"{name:{width}s}  {row['seeds']:5d}  " + "  ".join(f"{c:>26s}" for c in cells))
    print(f"figure: {args.out}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
