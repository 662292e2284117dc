"""Section 3: RefCOCO, OpenImages and SA-V, each through its own `Source.load` in one process, then through
`TrainBatches` with 0 and 2 workers, in one table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from dualrl.data.stream import SourceStream

from . import openimages, refcoco, sav
from .common import load_times, loader_rate


def other_sources(args: argparse.Namespace, tmp: Path) -> None:
    size = args.size
    print(
        f"3. other sources: one process's Source.load, then TrainBatches with num_workers 0 and 2; working size "
        f"{size} (squash), batch {args.batch_size}, prefetch 4"
    )

    written = [source.write_fixture(args, tmp) for source in (refcoco, openimages, sav)]
    for fixture in written:
        print(fixture["line"])
    rows = [row for source, fixture in zip((refcoco, openimages, sav), written) for row in source.rows(fixture, args)]

    # one process
    single: dict[str, tuple[list[float], float, float]] = {}
    notes, zip_notes = [], []
    quiet = logging.getLogger("dualrl.data.sources.base")  # index-time skips are counted below instead
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    for name, kind, make, _, loads, pairs in rows:
        src = make()
        stream = SourceStream(src, seed=0)
        t0 = time.perf_counter()
        n = stream.size()
        t_index = time.perf_counter() - t0
        if name == "OpenImages":
            zip_notes = openimages.zip_table_notes(src, stream, written[1], args)
        times, other, cores, sample = load_times(src, stream, loads)
        assert sample["image"].shape == (3, size, size) and ("seg_image" in sample) == pairs
        single[name + kind] = (times, other, cores)
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(stream.skipped.items())) or "none"
        notes.append(
            f"   {name} {kind}: index of {n} samples built in {1000 * t_index:.0f} ms (training process); "
            f"skipped while indexing: {skipped}"
        )
        del src, stream

    # loader throughput, configurations interleaved, best of rounds
    runs: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for name, kind, make, samples, _, pairs in rows:
                for workers in (0, 2):
                    runs.setdefault((name + kind, workers), []).append(
                        loader_rate(make, workers, samples, args.batch_size, size, pairs)
                    )
    finally:
        quiet.setLevel(level)
    print(
        f"   one process: Source.load timed on {args.source_loads} (images) / {args.video_loads} (video) draws "
        f"after 3 warm-up loads (torch threads {torch.get_num_threads()}); loader: {args.source_samples} / "
        f"{args.video_samples} samples after a 1-batch warm-up, best of {args.rounds} rounds (interleaved)"
    )
    print(
        "   cores = CPU time / wall time of the one-process loads (more than 1: the decoder's own threads); "
        "main CPU = the training process's"
    )
    print(
        "   CPU ms per sample in the loader runs (workers=0: loading and collating; workers=2: receiving from the "
        "workers and collating);"
    )
    print(
        "   others = share of the machine's CPU time used by other processes (one process / workers=0 / workers=2, "
        "the worst round)"
    )
    print()
    print(f"   {'':<30} {'one process':-^39}   {'TrainBatches, samples/s':-^31}   {'main CPU ms':>11}")
    print(
        f"   {'source':<11} {'sample':<18} {'ms/sample':>9} {'median':>7} {'samples/s':>10} {'cores':>6}   "
        f"{'workers=0':>9} {'workers=2':>10} {'2 / 0':>8}   {'w=0':>5} {'w=2':>5}   others"
    )
    for name, kind, *_ in rows:
        times, other, cores = single[name + kind]
        mean, median = 1000 * statistics.fmean(times), 1000 * statistics.median(times)
        w0, w2 = (max(runs[name + kind, w]) for w in (0, 2))
        o0, o2 = (max(r[2] for r in runs[name + kind, w]) for w in (0, 2))
        print(
            f"   {name:<11} {kind:<18} {mean:9.1f} {median:7.1f} {1000 / mean:10.1f} {cores:6.2f}   "
            f"{w0[0]:9.1f} {w2[0]:10.1f} {w2[0] / w0[0]:7.2f}x   {1000 * w0[3]:5.1f} {1000 * w2[3]:5.1f}   "
            f"{other:.0%} / {o0:.0%} / {o2:.0%}"
        )
    print()
    notes += zip_notes
    for name, kind, *_ in rows:
        each = ", ".join(f"{a[0]:.1f}/{b[0]:.1f}" for a, b in zip(runs[name + kind, 0], runs[name + kind, 2]))
        warm = max(r[1] for r in runs[name + kind, 2])
        notes.append(
            f"   {name} {kind}: samples/s workers=0/workers=2 each round: {each}; warm-up batch with 2 "
            f"workers at most {warm:.2f} s"
        )
    print("\n".join(notes))
    worst = max([o for _, o, _ in single.values()] + [r[2] for rs in runs.values() for r in rs])
    if worst > 0.1 and not args.quick:  # (tiny runs: a few ms, below the resolution of CPU times)
        print(f"   NOTE: other processes took up to {worst:.0%} of the CPU during a timed run: re-run")
    print()
