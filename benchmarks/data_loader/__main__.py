"""Data loading on the CPU: SA-1B throughput and index memory, RefCOCO / OpenImages / SA-V loads.

The command line of the benchmark; benchmarks/data_loader/__init__.py says what each section measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import os
import platform
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from .other_sources import other_sources
from .sa1b import index_memory, throughput


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_loader", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", default="1500x2250", help="h x w of the written images")
    parser.add_argument("--masks", type=int, default=50, help="annotations per image")
    parser.add_argument("--size", type=int, default=1024, help="working size (squash)")
    parser.add_argument("--samples", type=int, default=240, help="samples timed per worker count")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every worker count (best is shown)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--breakdown", type=int, default=50, help="samples of the one-process breakdown")
    parser.add_argument("--min-area", type=int, default=1024, help="Sa1bSpec.min_area (its default)")
    parser.add_argument("--index-files", type=int, default=10_000)
    parser.add_argument("--anns-per-file", type=int, default=100)
    parser.add_argument("--files-per-shard", type=int, default=1000)
    parser.add_argument("--refs", type=int, default=100, help="RefCOCO refs (one object each)")
    parser.add_argument("--ref-images", type=int, default=40, help="RefCOCO images the refs are spread over")
    parser.add_argument("--ref-image-size", default="480x640", help="h x w of the RefCOCO (COCO) images")
    parser.add_argument("--oi-annotations", type=int, default=100, help="OpenImages masks (over half as many images)")
    parser.add_argument("--oi-image-size", default="768x1024", help="h x w of the OpenImages images")
    parser.add_argument("--oi-mask-size", default="384x512", help="h x w of the OpenImages mask PNGs")
    parser.add_argument(
        "--zip-members",
        type=int,
        default=170_000,
        help="members of the published-size zip whose "
        "member table is timed (a published train-masks-<c>.zip has ~170k)",
    )
    parser.add_argument("--videos", type=int, default=8, help="SA-V videos")
    parser.add_argument("--video-seconds", type=float, default=10.0)
    parser.add_argument("--video-size", default="720x1280", help="h x w of the SA-V videos")
    parser.add_argument("--gop", type=int, default=48, help="SA-V keyframe interval (frames)")
    parser.add_argument("--x264-preset", default="faster", help="libx264 preset of the SA-V videos")
    parser.add_argument("--crf", type=int, default=21, help="libx264 crf of the SA-V videos")
    parser.add_argument("--grain", type=float, default=4.0, help="sigma of the SA-V videos' temporal grain (levels)")
    parser.add_argument(
        "--source-samples", type=int, default=192, help="RefCOCO/OpenImages samples timed per worker count"
    )
    parser.add_argument("--video-samples", type=int, default=64, help="SA-V samples timed per worker count")
    parser.add_argument("--source-loads", type=int, default=40, help="RefCOCO/OpenImages one-process loads timed")
    parser.add_argument("--video-loads", type=int, default=24, help="SA-V one-process loads timed (per kind)")
    parser.add_argument("--only", choices=["throughput", "index", "sources"])
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check that the script works")
    args = parser.parse_args()
    # `square` makes its tensor from PIL's read-only array (then copies it): torch warns once; harmless here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if args.quick:
        args.images, args.image_size, args.masks, args.size, args.min_area = 6, "300x450", 8, 256, 16
        args.samples, args.batch_size, args.breakdown, args.rounds = 16, 4, 8, 1
        args.index_files, args.anns_per_file, args.files_per_shard = 300, 20, 100
        args.refs, args.ref_images, args.ref_image_size = 8, 4, "120x160"
        args.oi_annotations, args.oi_image_size, args.oi_mask_size, args.zip_members = 8, "192x256", "96x128", 500
        args.videos, args.video_seconds, args.video_size, args.gop = 2, 2.0, "144x256", 12
        args.source_samples, args.video_samples, args.source_loads, args.video_loads = 8, 8, 4, 3
    args.hw = tuple(int(v) for v in args.image_size.lower().split("x"))

    packages = ("numpy", "pillow", "pycocotools", "torch", "av")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    print(f"$ python -m benchmarks.data_loader {shlex.join(sys.argv[1:])}")
    print(
        f"{datetime.date.today()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"python {platform.python_version()}, {versions}"
    )
    print()
    tmp = Path(tempfile.mkdtemp(prefix="dualrl-data-bench-", dir="/tmp"))
    try:
        index_out = io.StringIO()
        if args.only in (None, "index"):  # first, so that RSS is measured in a fresh process; printed second
            with contextlib.redirect_stdout(index_out if args.only is None else sys.stdout):
                index_memory(args, tmp)
        if args.only in (None, "throughput"):
            throughput(args, tmp)
        print(index_out.getvalue(), end="")
        if args.only in (None, "sources"):
            if args.only is None:
                print()
            other_sources(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
