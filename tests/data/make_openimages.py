"""Tiny OpenImages v7 segmentation fixtures in the published layout, with the ways real files break.

`make_openimages(root, cases, zipped)` writes the class CSV, the annotation CSV (exact header, one row per
case plus `BAD_LINES`, which indexing must skip), `<ImageID>.jpg` images (80x60) and mask PNGs at half or
double the image's size, as a folder or as `train-masks-<c>.zip` files, and returns the spec's paths.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dualrl.data.fixtures import OPENIMAGES_HEADER

CLASSES = {"/m/04yx4": "Man", "/m/0k4j": "Car", "/m/04bcr3": "Table, desk", "/m/01bad": "Caf\ufffd"}
W, H = 80, 60  # every image but the large one


@dataclass(frozen=True)
class Case:
    image_id: str
    label: str
    box: str
    image: str  # rgb, gray, rgba, 16bit, large (200x150), missing, truncated, text
    mask: str  # half (40x30), double (160x120), bit (mode "1", 40x30), tiny (1 px), zero, full, missing, corrupt
    expect: str | None  # None: loads; else the BadSample reason

    @property
    def mask_path(self) -> str:
        return f"{self.image_id}_{self.label.replace('/', '')}_{self.box}.png"

    @property
    def index(self) -> str:
        return f"{self.image_id}:{self.label}:{self.box}"

    def region(self, specks: bool = True) -> np.ndarray:
        """The expected mask at the image's size: a rectangle on even coordinates, different per case; double
        size masks add single pixels that nearest neighbour keeps and an area resize would drop."""
        k = int(self.box, 16) % 5
        mask = np.zeros((H, W), dtype=bool)
        mask[10 + 2 * k : 36 + 2 * k, 8 + 4 * k : 40 + 4 * k] = True
        if specks and self.mask == "double":
            mask[tuple(zip(*SPECKS))] = True
        return mask


SPECKS = [(50, 70), (4, 76), (57, 1)]  # (y, x) at the image's size, outside every rectangle


CASES = [
    Case("0a1b2c3d4e5f6071", "/m/04yx4", "b0", "rgb", "half", None),
    Case("0a1b2c3d4e5f6071", "/m/0k4j", "c1", "rgb", "double", None),
    Case("a1b2c3d4e5f60718", "/m/04bcr3", "d2", "gray", "bit", None),
    Case("f2c3d4e5f6071829", "/m/01bad", "e3", "rgba", "half", None),
    Case("f3c4d5e6f708192a", "/m/04yx4", "f4", "16bit", "double", None),
    Case("1b2c3d4e5f607182", "/m/04yx4", "a5", "large", "half", "image_too_large"),
    Case("2c3d4e5f60718293", "/m/04yx4", "a6", "missing", "half", "image_missing"),
    Case("3d4e5f6071829304", "/m/0k4j", "a7", "truncated", "half", "image_corrupt"),
    Case("4e5f607182930415", "/m/0k4j", "a8", "text", "half", "image_corrupt"),
    Case("5f60718293041526", "/m/04yx4", "a9", "rgb", "missing", "mask_missing"),
    Case("6071829304152637", "/m/04yx4", "aa", "rgb", "corrupt", "mask_missing"),
    Case("7182930415263748", "/m/04yx4", "ab", "rgb", "zero", "empty_mask"),
    Case("8293041526374859", "/m/04yx4", "ac", "rgb", "full", "full_mask"),
    Case("930415263748596a", "/m/04yx4", "ad", "rgb", "tiny", "mask_too_small"),
]
GOOD = [c for c in CASES if c.expect is None]
MIN_AREA = 10  # the tiny mask covers 4 pixels at the image's size
MAX_PIXELS = 10_000  # 80x60 passes, the large 200x150 does not

BAD_LINES = [  # each counted as annotation_corrupt while indexing
    b"b0c1d2e3f4a5b6c7_m04yx4_x1.png,b0c1d2e3f4a5b6c7,/m/04yx4\n",  # missing fields
    b"c0d1e2f3a4b5c6d7_m04yx4_x2.png,c0d1e2f3a4b5c6d7,/m/04yx4,x\xff\xfe,0.1,0.5,0.2,0.6,0.9,\n",  # not UTF-8
    b"d0e1f2a3b4c5d6e7_m0unknown_x3.png,d0e1f2a3b4c5d6e7,/m/0unknown,x3,0.1,0.5,0.2,0.6,0.9,\n",  # unknown label
]


def csv_line(case: Case, quoted: bool = False) -> bytes:
    clicks = '"0.25 0.5 1;0.3 0.55 0"' if quoted else "0.25 0.5 1;0.3 0.55 0"
    return f"{case.mask_path},{case.image_id},{case.label},{case.box},0.1,0.5,0.2,0.6,0.87,{clicks}\n".encode()


def write_classes(path: Path) -> None:
    lines = [b"LabelName,DisplayName"]
    for label, name in CLASSES.items():
        if "," in name:
            lines.append(f'{label},"{name}"'.encode())
        elif "\ufffd" in name:
            lines.append(label.encode() + b",Caf\xe9")  # a Latin-1 byte in a UTF-8 file
        else:
            lines.append(f"{label},{name}".encode())
    path.write_bytes(b"\n".join(lines) + b"\n")


def write_annotations(path: Path, cases: list[Case], bad_lines: list[bytes]) -> None:
    lines = [OPENIMAGES_HEADER.encode() + b"\n"]
    for i, case in enumerate(cases):
        lines.append(csv_line(case, quoted=i == 1))
        if i == 2:
            lines.extend(bad_lines)
    if len(cases) <= 2:
        lines.extend(bad_lines)
    lines[-1] = lines[-1].rstrip(b"\n") + b"\r\n"  # one Windows line end
    path.write_bytes(b"".join(lines) + b"\n")  # and a trailing blank line


def image_bytes(kind: str) -> bytes | None:
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 3, yy * 4, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "rgb":
        Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    elif kind == "gray":
        Image.fromarray(np.full((H, W), 200, np.uint8)).save(buf, "JPEG", quality=95)
    elif kind == "rgba":  # PNG content under a .jpg name: readers go by content
        Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)])).save(buf, "PNG")
    elif kind == "16bit":
        Image.fromarray(np.full((H, W), 0x8000, np.uint16)).save(buf, "PNG")
    elif kind == "large":
        Image.new("RGB", (200, 150), (10, 20, 30)).save(buf, "JPEG")
    elif kind == "truncated":
        full = image_bytes("rgb")
        return full[: len(full) // 2]
    elif kind == "text":
        return b"this is not an image\n"
    else:
        return None  # missing
    return buf.getvalue()


def mask_bytes(case: Case) -> bytes | None:
    region = case.region()
    if case.mask == "missing":
        return None
    if case.mask == "corrupt":
        return b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8
    if case.mask == "half" or case.mask == "bit":
        small = region[::2, ::2]
    elif case.mask == "double":  # a speck is one pixel of 2x2, the one at the centre of its output pixel
        small = np.repeat(np.repeat(case.region(specks=False), 2, axis=0), 2, axis=1)
        for y, x in SPECKS:
            small[2 * y + 1, 2 * x + 1] = True
    elif case.mask == "tiny":
        small = np.zeros((H // 2, W // 2), bool)
        small[7, 9] = True
    else:  # zero, full
        small = np.full((H // 2, W // 2), case.mask == "full")
    img = Image.fromarray(small) if case.mask == "bit" else Image.fromarray(small.astype(np.uint8) * 255)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_openimages(
    root: Path, cases: list[Case] | None = None, zipped: bool = False, bad_lines: list[bytes] | None = None
) -> dict[str, str]:
    """Write a fixture under root; the returned paths are `OpenImagesSpec` fields."""
    cases = CASES if cases is None else cases
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    write_classes(root / "oidv7-class-descriptions.csv")
    write_annotations(
        root / "train-annotations-object-segmentation.csv", cases, BAD_LINES if bad_lines is None else bad_lines
    )
    zips: dict[str, zipfile.ZipFile] = {}
    for case in cases:
        data = image_bytes(case.image)
        if data is not None:
            (root / "images" / f"{case.image_id}.jpg").write_bytes(data)
        png = mask_bytes(case)
        if png is None:
            continue
        if not zipped:
            (root / "masks" / case.mask_path).write_bytes(png)
            continue
        c = case.image_id[0]
        if c not in zips:
            zips[c] = zipfile.ZipFile(root / "masks" / f"train-masks-{c}.zip", "w", zipfile.ZIP_DEFLATED)
        member = f"train-masks-{c}/{case.mask_path}" if c == "a" else case.mask_path  # one zip with a folder
        zips[c].writestr(member, png)
    for z in zips.values():
        z.close()
    return {
        "annotations": str(root / "train-annotations-object-segmentation.csv"),
        "classes": str(root / "oidv7-class-descriptions.csv"),
        "images": str(root / "images"),
        "masks": str(root / "masks"),
    }
