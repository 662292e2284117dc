"""OpenImages v7 instance segmentation in its published layout.

Files (paths from `data.openimages`):
- `annotations`: `train-annotations-object-segmentation.csv`, a header, then one row per mask:
  `MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks` (box in 0..1, unused).
- `classes`: `oidv7-class-descriptions.csv`, `LabelName,DisplayName` (e.g. `/m/04yx4,Man`).
- `images`: a folder of `<ImageID>.jpg`.
- `masks`: binary PNGs named as the `MaskPath` column says (`<ImageID>_<LabelName without slashes>_<BoxID>.png`),
  at a resolution of their own, with the image's aspect ratio; in a folder, or in the published zips
  `train-masks-<ImageID[0]>.zip` (0-9, a-f). The published layout keeps a split's zips in a folder of their
  own (`<masks>/train/train-masks-0.zip`): `masks` may name that folder or the one above it.

Choices:
- A lean index. The CSV (2.7 M rows for train) is never held as Python objects. Shard k is the byte range
  [k * shard_bytes, (k + 1) * shard_bytes) of the CSV (64 MiB; shards are counted from the file size alone) and
  owns the lines that start inside it. Its index is one uint64 per usable row, the row's byte offset: `load`
  seeks there and parses that one line again. A row with another number of fields than 10, an empty key field,
  bytes that are not UTF-8 or a LabelName absent from the class file is counted as `annotation_corrupt`.
- Class names are weak references (a class is seldom unique in its image): `expression=None`, `references=[]`,
  `weak_references=[DisplayName]`, `label=LabelName`. A class row that is not UTF-8 is kept, its bad bytes
  decoded as U+FFFD (dropping it would drop every mask of the class); nothing is counted.
- The mask is brought to the image's size by nearest neighbour (the dataset's convention), then checked, so
  `min_area` counts pixels at the image's resolution. A mask of another aspect ratio than its image (beyond
  a pixel of rounding) would be stretched onto it: it is skipped as `mask_aspect_mismatch`.
- A mask is looked for in `<masks>`, then in `<masks>/<prefix>` (the published layout), where `prefix` is the
  annotation file's (`train`, `validation`, `test`): in each, as `<MaskPath>`, `<zip stem>/<MaskPath>`, then
  inside `<prefix>-masks-<ImageID[0]>.zip` at its root or under `<zip stem>/`. A zip's members are read
  through a `ZipTable`, built once per process when the zip is first needed (kept across a fork, never
  pickled), not through an open `ZipFile`.
- `split` is unused: the annotation file decides the split.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import zipfile
import zlib
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from dualrl.data.decode import BadSample, check_mask, read_image, read_mask_png
from dualrl.data.sources.base import Shard, Source, require, skip
from dualrl.data.transforms import resize_mask_nearest

FIELDS = 10  # MaskPath, ImageID, LabelName, BoxID, BoxXMin, BoxXMax, BoxYMin, BoxYMax, PredictedIoU, Clicks


def parse_row(line: bytes) -> list[str]:
    """One annotation line -> its 10 fields; ValueError when it cannot be used."""
    text = line.decode("utf-8").rstrip("\r\n")
    try:
        fields = next(csv.reader([text])) if '"' in text else text.split(",")
    except (csv.Error, StopIteration) as err:
        raise ValueError(f"unparsable CSV: {err}") from None
    if len(fields) != FIELDS:
        raise ValueError(f"{len(fields)} fields instead of {FIELDS}")
    if not all(fields[:4]):
        raise ValueError("empty MaskPath, ImageID, LabelName or BoxID")
    return fields


def same_aspect(mask_hw: tuple[int, int], image_hw: tuple[int, int]) -> bool:
    """Whether a mask stored at a resolution of its own has its image's aspect ratio. A mask scaled from the
    image by s and rounded either way is hm = s*h + e1, wm = s*w + e2 with |e| < 1, so |hm*w - wm*h| =
    |e1*w - e2*h| < h + w (likewise hm + wm when the image is the scaled one)."""
    (hm, wm), (h, w) = mask_hw, image_hw
    return abs(hm * w - wm * h) < max(h + w, hm + wm)


def read_classes(path: str | Path) -> dict[str, str]:
    """The class CSV -> {LabelName: DisplayName}; bytes that are not UTF-8 become U+FFFD."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    rows = csv.reader(io.StringIO(text, newline=""))
    return {r[0]: r[1].strip() for r in rows if len(r) >= 2 and r[0] and r[0] != "LabelName" and r[1].strip()}


class ZipTable:
    """The members of one zip as two numpy arrays, read with plain seeks once built.

    Why not keep a `zipfile.ZipFile` open: it holds its central directory as one `ZipInfo` object per member,
    ~104 MiB for a published `train-masks-<c>.zip` (~170k members), and with random access every loader worker
    ends up opening all 16 (~1.7 GB a worker). The table keeps what a read needs in ~75 bytes a member: the
    names, sorted for a binary search, and (local header offset, compressed size, size, CRC-32, method).
    `ZipFile` still parses the directory once (zip64 and data before the archive are its business).
    """

    ENTRY = np.dtype([("offset", "<u8"), ("csize", "<u8"), ("size", "<u8"), ("crc", "<u4"), ("method", "u1")])
    ENCRYPTED = 255  # stored as the method: not readable here

    def __init__(self, path: Path):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as zf:
            infos = zf.infolist()
        names = np.array([i.filename.encode() for i in infos], dtype=bytes)
        order = np.argsort(names, kind="stable")  # duplicates keep their order: the last one wins, as in ZipFile
        entries = np.array(
            [
                (
                    i.header_offset,
                    i.compress_size,
                    i.file_size,
                    i.CRC,
                    self.ENCRYPTED if i.flag_bits & 1 else i.compress_type,
                )
                for i in infos
            ],
            self.ENTRY,
        )
        self.names, self.entries = names[order], entries[order]
        self._file, self._pid = None, None

    def read(self, name: str) -> bytes | None:
        """The member's bytes, None when there is no such member; BadSample("mask_missing") when unreadable."""
        key = name.encode()
        i = int(np.searchsorted(self.names, key, side="right")) - 1
        if len(key) > self.names.itemsize or i < 0 or self.names[i] != key:
            return None
        offset, csize, size, crc, method = self.entries[i].tolist()
        where = f"{self.path}:{name}"
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BadSample("mask_missing", f"{where}: compression method {method} is not read (255: encrypted)")
        try:
            f = self._handle()
            f.seek(offset)
            header = f.read(30)  # local file header: signature, ..., name length, extra length
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise BadSample("mask_missing", f"{where}: no local file header at byte {offset}")
            f.seek(offset + 30 + sum(struct.unpack("<HH", header[26:30])))
            data = f.read(csize)
            if method == zipfile.ZIP_DEFLATED:  # raw deflate; at most size + 1 bytes out, even if corrupt
                data = zlib.decompressobj(-15).decompress(data, size + 1)
        except (OSError, zlib.error) as err:
            raise BadSample("mask_missing", f"{where}: {err}") from None
        if len(data) != size or zlib.crc32(data) != crc:
            raise BadSample(
                "mask_missing",
                f"{where}: corrupt ({len(data)} bytes, CRC-32 {zlib.crc32(data):08x}; "
                f"the directory says {size} bytes, {crc:08x})",
            )
        return data

    def _handle(self):
        if self._pid != os.getpid():  # a forked worker: the parent's handle would share its file offset
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 (kept open)
        return self._file


class OpenImagesSource(Source):
    name = "openimages"
    shard_bytes = 64 << 20

    def __init__(
        self,
        spec,
        size: int,
        split: str = "train",
        aspect: str = "squash",
        max_pixels: int = 1 << 28,
        cache_dir: str | None = None,
        shard_bytes: int | None = None,
    ):
        super().__init__(spec, size, aspect, max_pixels, cache_dir)
        self.split = split
        self.annotations = require(spec.annotations, "annotation CSV", "data.openimages.annotations")
        self.classes_path = require(spec.classes, "class CSV", "data.openimages.classes")
        self.images = require(spec.images, "image folder", "data.openimages.images")
        self.masks = require(spec.masks, "mask folder", "data.openimages.masks")
        if shard_bytes:
            self.shard_bytes = int(shard_bytes)
        stem = self.annotations.name
        self.zip_prefix = stem.split("-annotations")[0] if "-annotations" in stem else "train"
        self._classes: dict[str, str] | None = None
        self._zips: dict[Path, ZipTable | None] = {}  # None: no such zip

    @property
    def classes(self) -> dict[str, str]:
        if self._classes is None:
            self._classes = read_classes(self.classes_path)
        return self._classes

    def describe(self) -> str:
        return f"{self.name} ({self.annotations})"

    # --------------------------------------------------------------------------- training process
    def shards(self) -> list[str]:
        size = self.annotations.stat().st_size
        return [str(k) for k in range(max(1, -(-size // self.shard_bytes)))]

    def index_options(self) -> dict[str, Any]:
        return {"shard_bytes": self.shard_bytes}

    def shard_stamp(self, shard: str) -> list:
        """Path, size and mtime of the annotation CSV and of the class file (unknown labels are skipped)."""
        files = (self.annotations, self.classes_path)
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]

    def build_shard(self, shard: str) -> Shard:
        start = int(shard) * self.shard_bytes
        end = start + self.shard_bytes
        offsets, skipped, classes = array("Q"), {}, self.classes
        with open(self.annotations, "rb") as f:
            if start == 0:
                pos = len(f.readline())  # the header
            else:  # the line that holds byte start - 1 belongs to an earlier shard
                f.seek(start - 1)
                pos = start - 1 + len(f.readline())
            while pos < end:
                line = f.readline()
                if not line:
                    break
                if line.strip():
                    try:
                        label = parse_row(line)[2]
                        if label not in classes:
                            raise ValueError(f"LabelName {label!r} is not in {self.classes_path.name}")
                        offsets.append(pos)
                    except ValueError as err:  # UnicodeDecodeError included
                        skip(
                            skipped,
                            "annotation_corrupt",
                            f"{self.annotations.name} byte {pos}: {err} ({line[:80]!r})",
                            self.name,
                        )
                pos += len(line)
        return Shard(np.frombuffer(offsets, dtype=np.uint64).reshape(-1, 1), [], skipped)

    def key(self, index: Shard, shard: str, i: int) -> tuple:
        return (str(self.annotations), int(index.rows[i, 0]))

    # ----------------------------------------------------------------------------- worker process
    def load(self, key: tuple, seed: int) -> dict[str, Any]:
        path, offset = key
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            mask_path, image_id, label, box_id = parse_row(line)[:4]
        except ValueError as err:
            raise BadSample("annotation_corrupt", f"{path} byte {offset}: {err}") from None
        name = self.classes.get(label)
        if name is None:
            raise BadSample("annotation_corrupt", f"{path} byte {offset}: unknown LabelName {label!r}")
        image = read_image(self.images / f"{image_id}.jpg", self.max_pixels)
        file = self._mask_file(image_id, mask_path)
        try:
            mask = read_mask_png(file)
        except BadSample as bad:  # name the zip member, not "<bytes>"
            raise BadSample(bad.reason, bad.detail.replace("<bytes>", mask_path)) from None
        if not same_aspect(mask.shape, image.shape[:2]):
            raise BadSample(
                "mask_aspect_mismatch",
                f"{mask_path} is {mask.shape[0]}x{mask.shape[1]} (h x w), its image {image.shape[0]}x{image.shape[1]}",
            )
        mask = check_mask(resize_mask_nearest(mask, image.shape[:2]), self.spec.min_area)
        return self.region(
            image,
            mask,
            index=f"{image_id}:{label}:{box_id}",
            expression=None,
            references=[],
            weak_references=[name],
            label=label,
        )

    def _mask_file(self, image_id: str, mask_path: str) -> Path | bytes:
        stem = f"{self.zip_prefix}-masks-{image_id[0]}"
        folders = (self.masks, self.masks / self.zip_prefix)
        for folder in folders:
            for path in (folder / mask_path, folder / stem / mask_path):
                if path.is_file():
                    return path
            table = self._zip(folder / f"{stem}.zip")
            if table is not None:
                for member in (mask_path, f"{stem}/{mask_path}"):
                    data = table.read(member)
                    if data is not None:
                        return data
        where = " nor in ".join(f"{folder} (or its {stem}.zip)" for folder in folders)
        raise BadSample("mask_missing", f"{mask_path} is neither in {where}")

    def _zip(self, path: Path) -> ZipTable | None:
        if path not in self._zips:
            try:
                self._zips[path] = ZipTable(path)
            except FileNotFoundError:
                self._zips[path] = None
            except (OSError, zipfile.BadZipFile) as err:
                raise BadSample("mask_missing", f"{path} is not a readable zip: {err}") from None
        return self._zips[path]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zips": {}}
