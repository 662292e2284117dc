"""OpenImages v7 in its published layout: JPEGs, mask PNGs in deflated train-masks-<c>.zip, the CSVs; and the
cost of a zip's member table.
"""

from __future__ import annotations

import argparse
import io
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dualrl.data.fixtures import (
    OPENIMAGES_HEADER,
)
from dualrl.data.sources.openimages import OpenImagesSource, ZipTable
from dualrl.data.stream import SourceStream
from dualrl.recipe import OpenImagesSpec

from .common import MAX_PIXELS, Row, blob_annotation, hw, picture

OI_CLASSES = {
    "/m/01g317": "Person",
    "/m/0k4j": "Car",
    "/m/0bt9lr": "Dog",
    "/m/04yx4": "Man",
    "/m/03bt1vf": "Woman",
    "/m/0dzct": "Human face",
    "/m/04bcr3": "Table, desk",
}


def write_openimages(
    root: Path, anns: int, images: int, h: int, w: int, mh: int, mw: int, min_area: int, seed: int = 3
) -> dict[str, Any]:
    """OpenImages v7 layout: `images` <ImageID>.jpg (q90, photo-like), `anns` mask PNGs (mode L, 0/255, mh x
    mw, a blob of 0.05 %..30 % of the picture) in deflated train-masks-<c>.zip, the annotation and class CSVs."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 3, (h + 64, w + 64)).round().astype(np.int16)
    ids = [rng.bytes(8).hex() for _ in range(images)]
    jpg = png = 0
    for image_id in ids:
        Image.fromarray(picture(rng, h, w, grain)).save(root / "images" / f"{image_id}.jpg", quality=90)
        jpg += (root / "images" / f"{image_id}.jpg").stat().st_size
    labels = sorted(OI_CLASSES)
    lines, zips = [OPENIMAGES_HEADER], {}
    for a in range(anns):
        image_id, label, box_id = ids[a % images], labels[int(rng.integers(len(labels)))], rng.bytes(4).hex()
        while True:  # keep it over min_area (counted at the image's size) with a margin
            ann = blob_annotation(rng, mh, mw)
            if ann["area"] * (h * w) / (mh * mw) >= 2 * max(1, min_area):
                break
        seg = ann["segmentation"]
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})
        buf = io.BytesIO()
        Image.fromarray(mask * np.uint8(255)).save(buf, "PNG")
        png += len(buf.getvalue())
        mask_path = f"{image_id}_{label.replace('/', '')}_{box_id}.png"
        c = image_id[0]
        if c not in zips:
            zips[c] = zipfile.ZipFile(root / "masks" / f"train-masks-{c}.zip", "w", zipfile.ZIP_DEFLATED)
        zips[c].writestr(mask_path, buf.getvalue())
        x, y, bw, bh = ann["bbox"]
        clicks = ";".join(f"{rng.uniform():.5f} {rng.uniform():.5f} {int(rng.integers(2))}" for _ in range(3))
        lines.append(
            f"{mask_path},{image_id},{label},{box_id},{x / mw:.6f},{(x + bw) / mw:.6f},{y / mh:.6f},"
            f"{(y + bh) / mh:.6f},{ann['predicted_iou']:.5f},{clicks}"
        )
    for z in zips.values():
        z.close()
    (root / "train-annotations-object-segmentation.csv").write_text("\n".join(lines) + "\n")
    (root / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f'{k},"{v}"\n' if "," in v else f"{k},{v}\n" for k, v in OI_CLASSES.items())
    )
    zipped = sum(p.stat().st_size for p in (root / "masks").glob("*.zip"))
    spec = {
        "annotations": str(root / "train-annotations-object-segmentation.csv"),
        "classes": str(root / "oidv7-class-descriptions.csv"),
        "images": str(root / "images"),
        "masks": str(root / "masks"),
    }
    return {
        "spec": spec,
        "jpg_kb": jpg / images / 1e3,
        "png_kb": png / anns / 1e3,
        "zips": len(zips),
        "zipped_kb": zipped / anns / 1e3,
    }


def write_padded_zip(path: Path, members: int, seed: int = 4) -> None:
    """A zip with `members` empty stored members named like OpenImages masks: the central directory of a
    published train-masks-<c>.zip, without its data."""
    rng = np.random.default_rng(seed)
    names = [f"{h[:16]}_m0k4j_{h[16:]}.png" for h in (rng.bytes(12).hex() for _ in range(members))]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name in names:
            z.writestr(name, b"")


def write_fixture(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The fixture of `--oi-annotations` masks over half as many images, and the published-size zip of
    `--zip-members` members, timed; its "line" describes them."""
    t0 = time.perf_counter()
    (h, w), (mh, mw), images = hw(args.oi_image_size), hw(args.oi_mask_size), max(1, args.oi_annotations // 2)
    min_area = OpenImagesSpec.model_fields["min_area"].default
    oi = write_openimages(tmp / "openimages", args.oi_annotations, images, h, w, mh, mw, min_area)
    t_oi = time.perf_counter() - t0
    t0 = time.perf_counter()
    oi["padded"] = tmp / "zip-table" / "train-masks-0.zip"
    oi["padded"].parent.mkdir()
    write_padded_zip(oi["padded"], args.zip_members)
    oi["t_pad"] = time.perf_counter() - t0
    oi["line"] = (
        f"   OpenImages v7: {args.oi_annotations} masks over {images} images {h}x{w}, JPEG q90 "
        f"{oi['jpg_kb']:.0f} KB; mask PNGs {mh}x{mw} mode L ({oi['png_kb']:.1f} KB mean, {oi['zipped_kb']:.1f} KB "
        f"deflated) in {oi['zips']} train-masks-<c>.zip; min_area {min_area}; written in {t_oi:.1f} s"
    )
    return oi


def rows(fixture: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    def make() -> OpenImagesSource:
        return OpenImagesSource(OpenImagesSpec(**fixture["spec"]), args.size, aspect="squash", max_pixels=MAX_PIXELS)

    return [Row("OpenImages", "zip PNG + JPEG", make, args.source_samples, args.source_loads, False)]


def zip_table_notes(
    src: OpenImagesSource, stream: SourceStream, fixture: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    """What the zip member tables cost: the first load of a fresh (pickled) copy of the source, the tables of
    the fixture's zips (built here, before the steady-state timing) and that of a published-size zip."""
    fresh = pickle.loads(pickle.dumps(src))  # as a spawned worker gets it: no zip table yet
    key = stream.key(0)
    t0 = time.perf_counter()
    fresh.load(key, 0)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.load(key, 0)
    t_again = time.perf_counter() - t0
    zips = sorted(Path(fixture["spec"]["masks"]).glob("*.zip"))
    t0 = time.perf_counter()
    for path in zips:
        src._zip(path)  # every table built before the steady-state timing (the source's own cache)
    t_tables = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = ZipTable(fixture["padded"])
    t_big = time.perf_counter() - t0
    big_bytes = table.names.nbytes + table.entries.nbytes
    return [
        "   OpenImages zip member tables (ZipTable: built in each loading process, per zip, at its first use):",
        f"     first load, fresh copy of the source (pickled, as a worker gets it) {1000 * t_first:.1f} ms, "
        f"the same key again {1000 * t_again:.1f} ms",
        f"     the {len(zips)} fixture zips ({args.oi_annotations / len(zips):.0f} members each): "
        f"{1000 * t_tables:.1f} ms in all (built before the steady-state timing below)",
        f"     a published-size zip ({args.zip_members:,} empty members, written in {fixture['t_pad']:.1f} s): "
        f"{1000 * t_big:.0f} ms, table {big_bytes / 2**20:.1f} MiB; x 16 zips = ~{16 * t_big:.0f} s and "
        f"~{16 * big_bytes / 2**20:.0f} MiB per loading process (each worker; the training process with "
        f"workers=0), spread over its first loads",
    ]
