"""One consolidated bad-data corpus: for each real source (RefCOCO, SA-1B, SA-V, OpenImages) a folder of
broken inputs beside a few good ones, each with a readable case name and the outcome the loader must give.

`build_corpus(root)` writes the four folders under root and returns {source name: Corpus}. A Corpus holds
the source object (constructed as `dualrl.data.loader.build_source` does) and the accounting:

- `expected`: case -> skip reason at load time, or "ok" for a case that must load. A case owns one or more
  keys of the source's epoch (`case_of(key)` names it); a good case's samples carry an `index` that
  `good_index` maps back to the case.
- `index_cases`: case -> the reason it is skipped for while the shard index is built (never a key);
  `index_expected` counts them by reason.
- `after_index`: what to break once the index is built (files deleted after indexing).

Images are tiny (48x64; OpenImages 60x80, the fixture's size), so the whole corpus loads in seconds.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image

from dualrl.data.fixtures import OPENIMAGES_HEADER, VIDEO_CODEC, VIDEO_FPS, coco_rle, py2_pickle, refer_sentence
from dualrl.data.sources.base import Source
from dualrl.data.sources.openimages import OpenImagesSource
from dualrl.data.sources.refcoco import RefCocoSource
from dualrl.data.sources.sa1b import Sa1bSource
from dualrl.data.sources.sav import SavSource
from dualrl.recipe import OpenImagesSpec, RefCocoSpec, Sa1bSpec, SavSpec
from tests.data import make_openimages as mk_oi
from tests.data.make_sa1b import annotation, boxes_image
from tests.data.make_sav import grey, object_mask, write_json, write_mp4, write_npz

H, W = 48, 64  # every image but OpenImages' (mk_oi.H x mk_oi.W, the size its masks are drawn for)
SIZE = 32  # the working square
MAX_PIXELS = 64_000_000  # data.max_image_pixels' default
MIN_AREA = {"refcoco": 20, "sa1b": 20, "sav": 20, "openimages": mk_oi.MIN_AREA}
HUGE = 30_000  # the side of the absurdly large image
OK = "ok"


@dataclass
class Corpus:
    name: str
    source: Source
    expected: dict[str, str]  # case -> load-time reason or "ok"
    case_of: Callable[[tuple], str]  # a key of the source's epoch -> its case
    good_index: dict[str, str]  # a good sample's `index` -> its case
    index_cases: dict[str, str] = field(default_factory=dict)  # case -> reason it is skipped for at index time
    after_index: Callable[[], None] | None = None  # breaks files once the index is built
    index_expected: dict[str, int] = field(init=False)  # index-time skips by reason

    def __post_init__(self):
        self.index_expected = dict(Counter(self.index_cases.values()))

    @property
    def good(self) -> list[str]:
        return [case for case, reason in self.expected.items() if reason == OK]

    @property
    def broken(self) -> list[str]:
        return [case for case, reason in self.expected.items() if reason != OK] + list(self.index_cases)

    def reasons(self) -> set[str]:
        return {r for r in self.expected.values() if r != OK} | set(self.index_cases.values())


# ------------------------------------------------------------------------------------------- images
@functools.lru_cache(maxsize=1)
def huge_png() -> bytes:
    """A valid 30000x30000 1-bit PNG (900 M pixels) of ~100 kB: IHDR says the size, IDAT is all zeros."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = bytes(1 + (HUGE + 7) // 8) * 1000  # filter byte + packed bits, 1000 rows at a time
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(rows) for _ in range(HUGE // 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", HUGE, HUGE, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def image_bytes(kind: str, h: int = H, w: int = W, seed: int = 0) -> bytes | None:
    """The bytes stored under `<name>.jpg` for an image kind (None: the file is missing). Good kinds hold an
    h x w picture in stored pixel order; "transposed" is that picture rotated and saved w x h, as a tool that
    applies EXIF orientation saves it."""
    rgb = boxes_image(h, w, [(2, 2, 18, 18)], seed)[0]
    if kind == "rgb":
        return _save(Image.fromarray(rgb), "JPEG", quality=95)
    if kind == "gray":
        return _save(Image.fromarray(rgb[..., 0]), "JPEG", quality=95)
    if kind == "rgba":  # PNG content under a .jpg name: readers go by content
        return _save(Image.fromarray(np.dstack([rgb, np.full((h, w), 128, np.uint8)])), "PNG")
    if kind == "png_16bit":
        return _save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG")
    if kind == "palette":
        return _save(Image.fromarray(rgb).convert("P"), "PNG")
    if kind == "palette_transparent":
        return _save(Image.fromarray(rgb).convert("P"), "PNG", transparency=0)
    if kind == "png_1bit":
        return _save(Image.fromarray(rgb[..., 0] > 110), "PNG")
    if kind == "gray_alpha":
        return _save(Image.fromarray(np.dstack([rgb[..., 0], np.full((h, w), 200, np.uint8)]), "LA"), "PNG")
    if kind == "tiff_float32":
        return _save(Image.fromarray(rgb[..., 0].astype(np.float32) / 255), "TIFF")
    if kind == "cmyk":
        return _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    if kind == "exif_rotated":  # stored h x w (as annotated), displayed rotated
        exif = Image.Exif()
        exif[0x0112] = 6
        return _save(Image.fromarray(rgb), "JPEG", quality=95, exif=exif)
    if kind == "transposed":
        return _save(Image.fromarray(np.ascontiguousarray(np.rot90(rgb, -1))), "JPEG", quality=95)
    if kind == "truncated":
        full = image_bytes("rgb", h, w, seed)
        return full[: len(full) // 2]
    if kind == "not_image":
        return b"this is not an image\n" * 4
    if kind == "empty":
        return b""
    if kind == "huge":  # a PNG under the .jpg name
        return huge_png()
    if kind == "huge_jpeg":  # a JPEG whose frame header says 8000x9000: over max_pixels, under PIL's bomb limit
        data = bytearray(image_bytes("rgb", h, w, seed))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 8000)
        return bytes(data)
    if kind == "missing":
        return None
    raise ValueError(kind)


# Image kinds every image-reading source gets: case name -> (kind, expected at load).
IMAGE_CASES = {
    "rgb_jpeg": ("rgb", OK),
    "gray_jpeg": ("gray", OK),
    "rgba_png": ("rgba", OK),
    "png_16bit": ("png_16bit", OK),
    "palette_png": ("palette", OK),
    "palette_png_with_transparency": ("palette_transparent", OK),
    "png_1bit": ("png_1bit", OK),
    "png_gray_alpha": ("gray_alpha", OK),
    "tiff_float32": ("tiff_float32", OK),
    "cmyk_jpeg": ("cmyk", OK),
    "exif_rotated_jpeg": ("exif_rotated", OK),
    "exif_transposed_jpeg": ("transposed", "mask_size_mismatch"),
    "jpeg_truncated": ("truncated", "image_corrupt"),
    "jpeg_not_an_image": ("not_image", "image_corrupt"),
    "jpeg_empty_file": ("empty", "image_corrupt"),
    "image_missing": ("missing", "image_missing"),
    "huge_png_header": ("huge", "image_too_large"),  # PIL's decompression-bomb limit says so
    "huge_jpeg_header": ("huge_jpeg", "image_too_large"),  # read_image's own max_pixels check says so
}


def _write(path: Path, data: bytes | None) -> None:
    if data is not None:
        path.write_bytes(data)


def _box(y0: int, x0: int, y1: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


BOX = _box(2, 2, 18, 18)  # 256 px
RUNS_SHORT = {"size": [H, W], "counts": coco_rle(_box(2, 2, 18, 18, 40, W))["counts"]}  # runs sum to 40*64
BAD_ALPHABET = {"size": [H, W], "counts": "PP!!~~ not rle"}
NEGATIVE_COUNTS = {"size": [H, W], "counts": [-5, H * W + 5]}
ENDS_INSIDE_A_RUN = {"size": [H, W], "counts": coco_rle(BOX)["counts"] + "P"}  # "P": a continuation bit


# ------------------------------------------------------------------------------------------ RefCOCO
SQUARE = [[2.0, 2.0, 18.0, 2.0, 18.0, 18.0, 2.0, 18.0]]
REFCOCO_MASKS = {  # case -> (segmentation, expected) on a good image
    "polygon_with_a_box_part": ([*SQUARE, [1.0, 1.0, 5.0, 5.0]], OK),
    "rle_compressed": (coco_rle(BOX), OK),
    "rle_uncompressed": ({"size": [H, W], "counts": [H * 10 + 5, 40, H * W - H * 10 - 45]}, OK),
    "polygon_4_numbers": ([[1.0, 1.0, 5.0, 5.0]], "bad_polygon"),
    "polygon_nan": ([[0.0, 0.0, float("nan"), 1.0, 20.0, 20.0, 0.0, 20.0]], "bad_polygon"),
    "polygon_empty_list": ([], "bad_polygon"),
    "polygon_non_numeric": ([["a", "b", "c", "d", "e", "f"]], "bad_polygon"),
    "rle_runs_dont_sum": (RUNS_SHORT, "bad_rle"),
    "rle_bad_alphabet": (BAD_ALPHABET, "bad_rle"),
    "rle_negative_counts": (NEGATIVE_COUNTS, "bad_rle"),
    "rle_ends_inside_a_run": (ENDS_INSIDE_A_RUN, "bad_rle"),
    "segmentation_null": (None, "bad_polygon"),
    "mask_wrong_size": (coco_rle(_box(2, 2, 18, 18, 50, W)), "mask_size_mismatch"),
    "empty_mask": ({"size": [H, W], "counts": [H * W]}, "empty_mask"),
    "full_mask": ([[0.0, 0.0, 64.0, 0.0, 64.0, 48.0, 0.0, 48.0]], "full_mask"),
    "mask_under_min_area": ([[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]], "mask_too_small"),  # 16 px
}
GOOD_SENTENCE = "the good one"
REFCOCO_TEXT = {  # case -> (sentences, ann_id or None for the good one, expected or index reason)
    "one_bad_one_good_sentence": ([b"\xff\xfe not utf-8", GOOD_SENTENCE], None, OK),
    "no_usable_sentence": ([b"\xff\xfe bad", "   ", ""], None, "bad_text"),
    "no_sentences": ([], None, "bad_text"),
    "unknown_ann_id": (["a box"], 9999, "annotation_corrupt"),
}


def build_refcoco(root: Path) -> Corpus:
    folder, images = root / "refcoco", root / "train2014"
    folder.mkdir(parents=True)
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing", "supercategory": "x"}]}
    image_ids: dict[str, int] = {}
    for n, (case, (kind, _)) in enumerate(IMAGE_CASES.items()):
        image_id = 100 + n
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _write(images / name, image_bytes(kind, seed=n))
        coco["images"].append({"id": image_id, "file_name": name, "height": H, "width": W, "license": 1})
        image_ids[case] = image_id
    refs, expected, index_cases, by_ref = [], {}, {}, {}

    def add(case: str, image_id: int, segmentation, sentences: list, ann_id: int | None = None) -> None:
        ref_id = len(by_ref) + 1
        coco["annotations"].append(
            {
                "id": ref_id,
                "image_id": image_id,
                "category_id": 1,
                "area": 256.0,
                "segmentation": segmentation,
                "bbox": [2, 2, 16, 16],
                "iscrowd": int(isinstance(segmentation, dict)),
            }
        )
        refs.append(
            {
                b"sent_ids": list(range(len(sentences))),
                b"file_name": b"x.jpg",
                b"ann_id": ann_id or ref_id,
                b"ref_id": ref_id,
                b"image_id": image_id,
                b"split": b"train",
                b"category_id": 1,
                b"sentences": [refer_sentence(10 * ref_id + i, s) for i, s in enumerate(sentences)],
            }
        )
        by_ref[ref_id] = case

    good_image = image_ids["rgb_jpeg"]
    for case, (_, reason) in IMAGE_CASES.items():
        add(case, image_ids[case], SQUARE, [f"the square in {case}"])
        expected[case] = reason
    for case, (segmentation, reason) in REFCOCO_MASKS.items():
        add(case, good_image, segmentation, [f"the region of {case}"])
        expected[case] = reason
    for case, (sentences, ann_id, reason) in REFCOCO_TEXT.items():
        add(case, good_image, SQUARE, sentences, ann_id)
        (expected if reason == OK else index_cases)[case] = reason
    index_cases["one_bad_one_good_sentence: its sentence that is not UTF-8"] = "bad_sentence"  # ref kept
    refs.append({**refs[0], b"ref_id": 999, b"split": b"val"})  # another split: not read, not counted
    (folder / "instances.json").write_text(json.dumps(coco))  # NaN is written as NaN, as Python's json reads it
    (folder / "refs(unc).p").write_bytes(py2_pickle(refs))
    spec = RefCocoSpec(root=str(root), images=str(images), min_area=MIN_AREA["refcoco"])
    source = RefCocoSource(spec, size=SIZE, split="train", aspect="squash", max_pixels=MAX_PIXELS, cache_dir=None)
    good_index = {f"refcoco:{ref}": case for ref, case in by_ref.items() if expected.get(case) == OK}
    return Corpus("refcoco", source, expected, lambda key: by_ref[key[-1]], good_index, index_cases)


# -------------------------------------------------------------------------------------------- SA-1B
def _sa1b_json(folder: Path, n: int, anns: list[dict], h: int = H, w: int = W) -> Path:
    path = folder / f"sa_{n}.json"
    path.write_text(
        json.dumps({"image": {"image_id": n, "width": w, "height": h, "file_name": f"sa_{n}.jpg"}, "annotations": anns})
    )
    return path


def build_sa1b(root: Path) -> Corpus:
    folder = root / "sa1b"
    folder.mkdir(parents=True)
    good = annotation(0, BOX)  # 256 px
    expected, index_cases, where = {}, {}, {}  # where: (stem, annotation ordinal) -> case

    def ann(ann_id: int, segmentation, area: float = 256) -> dict:
        return {**good, "id": ann_id, "segmentation": segmentation, "area": area}

    # one good image, many masks; "area" is the JSON's (index-time filter), the RLE decides at load time
    masks = {
        "rle_box": (good, OK),
        "empty_mask": (ann(1, coco_rle(np.zeros((H, W), bool))), "empty_mask"),
        "full_mask": (ann(2, coco_rle(np.ones((H, W), bool)), H * W), "full_mask"),
        "mask_under_min_area_json_area_wrong": (ann(3, coco_rle(_box(2, 2, 4, 4))), "mask_too_small"),
        "mask_wrong_size": (ann(4, coco_rle(_box(2, 2, 18, 18, 50, W))), "mask_size_mismatch"),
        "rle_runs_dont_sum": (ann(5, RUNS_SHORT), "bad_rle"),
        "rle_bad_alphabet": (ann(6, BAD_ALPHABET), "bad_rle"),
        "rle_negative_counts": (ann(7, NEGATIVE_COUNTS), "bad_rle"),
        "rle_without_counts": (ann(8, {"size": [H, W]}), "bad_rle"),
        "rle_ends_inside_a_run": (ann(9, ENDS_INSIDE_A_RUN), "bad_rle"),
        "rle_zero_size": (ann(10, {"size": [0, 0], "counts": ""}), "bad_rle"),
        "segmentation_missing": ({k: v for k, v in ann(11, None).items() if k != "segmentation"}, "annotation_corrupt"),
    }
    anns = [a for a, _ in masks.values()] + [ann(len(masks), coco_rle(_box(2, 2, 4, 4)), area=4)]
    index_cases["mask_under_min_area"] = "mask_too_small"  # by the JSON's area: never a key
    _write(folder / "sa_1.jpg", image_bytes("rgb"))
    _sa1b_json(folder, 1, anns)
    for i, (case, (_, reason)) in enumerate(masks.items()):
        where["sa_1", i] = case
        expected[case] = reason
    n = 2
    for case, (kind, reason) in IMAGE_CASES.items():
        if case == "rgb_jpeg":
            continue
        _write(folder / f"sa_{n}.jpg", image_bytes(kind, seed=n))
        _sa1b_json(folder, n, [good])
        if kind == "missing":
            index_cases[f"{case}_at_index"] = "image_missing"  # indexing checks the jpg exists
        else:
            where[f"sa_{n}", 0] = case
            expected[case] = reason
        n += 1
    breaks = {  # case -> (JSON text or None for a good one, index reason or None)
        "json_corrupt": ('{"image": {"height": 48', "annotation_corrupt"),
        "json_without_annotations": ('{"image": {"height": 48, "width": 64}}', "annotation_corrupt"),
        "json_not_an_object": ("[1, 2, 3]", "annotation_corrupt"),
        "json_not_utf8": (b'{"annotations": [], "note": "caf\xe9"}', "annotation_corrupt"),
        "json_without_image_info": (json.dumps({"annotations": [good]}), None),  # read at load time only
        "image_deleted_after_indexing": (None, None),
        "json_deleted_after_indexing": (None, None),
    }
    stems = {}
    for case, (text, reason) in breaks.items():
        _write(folder / f"sa_{n}.jpg", image_bytes("rgb", seed=n))
        path = _sa1b_json(folder, n, [good])
        if text is not None:
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        if reason is not None:
            index_cases[case] = reason
        else:
            where[f"sa_{n}", 0] = case
            stems[case] = f"sa_{n}"
        n += 1
    expected["image_deleted_after_indexing"] = "image_missing"
    expected["json_deleted_after_indexing"] = "annotation_corrupt"
    expected["json_without_image_info"] = "annotation_corrupt"

    def after_index() -> None:
        (folder / f"{stems['image_deleted_after_indexing']}.jpg").unlink()
        (folder / f"{stems['json_deleted_after_indexing']}.json").unlink()

    spec = Sa1bSpec(root=str(folder), min_area=MIN_AREA["sa1b"])
    source = Sa1bSource(spec, size=SIZE, aspect="squash", max_pixels=MAX_PIXELS, cache_dir=None)
    # a sample's index is "<stem>:<annotation id>"; here every id is the annotation's ordinal
    good_index = {f"{stem}:{i}": case for (stem, i), case in where.items() if expected[case] == OK}
    return Corpus(
        "sa1b", source, expected, lambda key: where[Path(key[0]).name, key[1]], good_index, index_cases, after_index
    )


# -------------------------------------------------------------------------------------------- SA-V
FRAMES = 8  # video frames (annotations 0, 1 = frames 0, 4)


def write_faststart_mp4(path: Path, frames: int = 40, fps: int = VIDEO_FPS) -> Path:
    """Like make_sav.write_mp4, with the moov box before the frames (movflags=faststart), as streamed files are."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = 4
        if VIDEO_CODEC == "libx264":
            stream.options = {"crf": "10", "keyint_min": "4"}
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((H, W, 3), grey(i), np.uint8), format="rgb24")))
        out.mux(stream.encode())
    return path


def _masklet(visible: list[bool], height: int = H, width: int = W) -> list[list[dict]]:
    """One object: obj0's box where visible, an all-zero RLE (out of view) elsewhere."""
    return [
        [coco_rle(object_mask(0, k, height, width) if v else np.zeros((height, width), bool))]
        for k, v in enumerate(visible)
    ]


OUT_OF_VIEW = coco_rle(np.zeros((H, W), bool))
ZERO_RUNS_SHORT = {"size": [H, W], "counts": coco_rle(np.zeros((40, W), bool))["counts"]}  # area 0, runs 40*64
JSON_SIZE = {"json_size_not_video_size": {"height": 24, "width": 32}}  # the JSON's video_height, video_width


def build_sav(root: Path) -> Corpus:
    base = root / "sav"
    videos, pairs = base / "sav_000", base / "npz_pairs"
    videos.mkdir(parents=True)
    good_mp4 = write_mp4(videos / "sav_000001.mp4", frames=FRAMES, gop=4)
    data = good_mp4.read_bytes()
    expected, index_cases, stems = {}, {}, {}
    # case -> (mp4: "good", "truncated", "text", "empty", "faststart_cut", "30fps", None; masklet JSON text or
    # list; reason). An 8-frame video has 2 annotated frames (0, 4); every masklet has 2 unless its case says.
    cases = {
        "video_pair": ("good", _masklet([True, True]), OK),  # rows k=0 (a pair, frames 0+4) and k=1 (frame 4)
        "video_missing_at_index": (None, _masklet([True, False]), "video_missing"),
        "video_deleted_after_indexing": ("good", _masklet([True, False]), "video_missing"),
        "json_deleted_after_indexing": ("good", _masklet([True, False]), "annotation_corrupt"),
        "json_corrupt": ("good", '{"video_id": "x", "masklet": [[{"size"', "annotation_corrupt"),
        "json_without_masklet": ("good", '{"video_id": "x"}', "annotation_corrupt"),
        "json_not_utf8": ("good", b'{"video_id": "caf\xe9", "masklet": []}', "annotation_corrupt"),
        "json_size_not_video_size": ("good", _masklet([True, False]), "mask_size_mismatch"),
        "mp4_truncated": ("truncated", _masklet([True, False]), "video_corrupt"),  # cannot be opened
        "mp4_faststart_truncated": ("faststart_cut", _masklet([False] * 9 + [True]), "video_corrupt"),  # frame 36
        "mp4_not_a_video": ("text", _masklet([True, False]), "video_corrupt"),
        "mp4_empty_file": ("empty", _masklet([True, False]), "video_corrupt"),
        "video_at_30_fps": ("30fps", _masklet([True, False]), "video_frame_rate"),
        "masklet_longer_than_video": ("good", _masklet([False, False, False, True]), "masklet_mismatch"),
        "masklet_shorter_than_video": ("good", _masklet([True]), "masklet_mismatch"),
        "objects_per_frame_differ": ("good", [[OUT_OF_VIEW], [OUT_OF_VIEW, OUT_OF_VIEW]], "masklet_mismatch"),
        "rle_smaller_than_video": ("good", _masklet([True, False], 24, 32), "mask_size_mismatch"),
        "rle_runs_dont_sum": (
            "good",
            [[{"size": [H, W], "counts": coco_rle(object_mask(0, 0, 40, W))["counts"]}], [OUT_OF_VIEW]],
            "bad_rle",
        ),
        "rle_bad_alphabet": ("good", [[BAD_ALPHABET], [OUT_OF_VIEW]], "bad_rle"),
        "rle_uncompressed_negative_counts": ("good", [[NEGATIVE_COUNTS], [OUT_OF_VIEW]], "bad_rle"),
        "rle_area_zero_runs_dont_sum": ("good", [[ZERO_RUNS_SHORT], [OUT_OF_VIEW]], "bad_rle"),  # not out of view
    }
    at_index = {
        "video_missing_at_index",
        "json_corrupt",
        "json_without_masklet",
        "json_not_utf8",
        "json_size_not_video_size",
        "mp4_truncated",
        "mp4_not_a_video",
        "mp4_empty_file",
        "video_at_30_fps",
        "masklet_longer_than_video",
        "masklet_shorter_than_video",
        "objects_per_frame_differ",
        "rle_bad_alphabet",
        "rle_uncompressed_negative_counts",
        "rle_area_zero_runs_dont_sum",
    }
    for n, (case, (mp4, masklet, reason)) in enumerate(cases.items(), start=1):
        stem = f"sav_{n:06d}"
        stems[stem] = case
        path = videos / f"{stem}.mp4"
        if mp4 == "good" and n > 1:
            path.write_bytes(data)
        elif mp4 == "truncated":
            path.write_bytes(data[: int(len(data) * 0.3)])  # the moov box is at the end: gone
        elif mp4 == "text":
            path.write_text("not a video at all\n" * 50)
        elif mp4 == "empty":
            path.write_bytes(b"")
        elif mp4 == "faststart_cut":  # moov first, then 80% of the frames' data: the late frames are gone
            full = write_faststart_mp4(path).read_bytes()
            path.write_bytes(full[: int(len(full) * 0.8)])
        elif mp4 == "30fps":
            write_faststart_mp4(path, frames=FRAMES, fps=30)
        if isinstance(masklet, (str, bytes)):
            (videos / f"{stem}_manual.json").write_bytes(masklet if isinstance(masklet, bytes) else masklet.encode())
        else:
            write_json(videos / f"{stem}_manual.json", stem, masklet, frames=FRAMES, **JSON_SIZE.get(case, {}))
        (index_cases if case in at_index else expected)[case] = reason
    # pre-extracted pairs: file stem = case name
    write_npz(pairs / "npz_pair.npz", frame1=1, frame2=5)
    write_npz(pairs / "npz_missing_key.npz", drop="mask2")
    write_npz(pairs / "npz_mask_wrong_size.npz", mask_hw=(24, 32))
    (pairs / "npz_not_a_zip.npz").write_text("not a zip")
    npz = (pairs / "npz_pair.npz").read_bytes()
    (pairs / "npz_truncated.npz").write_bytes(npz[: len(npz) // 2])
    write_npz(pairs / "npz_deleted_after_indexing.npz")
    frame = np.full((H, W, 3), grey(2), np.uint8)
    for case, mask in (
        ("npz_empty_mask", np.zeros((H, W), bool)),
        ("npz_full_mask", np.ones((H, W), bool)),
        ("npz_mask_under_min_area", _box(2, 2, 4, 4)),
    ):
        np.savez(pairs / f"{case}.npz", frame1=frame, mask1=mask, frame2=frame, mask2=BOX)
    expected.update(
        {
            "npz_pair": OK,
            "npz_missing_key": "annotation_corrupt",
            "npz_mask_wrong_size": "mask_size_mismatch",
            "npz_not_a_zip": "annotation_corrupt",
            "npz_truncated": "annotation_corrupt",
            "npz_deleted_after_indexing": "video_missing",
            "npz_empty_mask": "empty_mask",
            "npz_full_mask": "full_mask",
            "npz_mask_under_min_area": "mask_too_small",
        }
    )
    by_case = {case: stem for stem, case in stems.items()}

    def after_index() -> None:
        (videos / f"{by_case['video_deleted_after_indexing']}.mp4").unlink()
        (videos / f"{by_case['json_deleted_after_indexing']}_manual.json").unlink()
        (pairs / "npz_deleted_after_indexing.npz").unlink()

    def case_of(key: tuple) -> str:
        stem = Path(key[1]).stem
        return stem if key[0] == "npz" else stems[stem]

    spec = SavSpec(root=str(base), pair_gap=1, min_area=MIN_AREA["sav"], pairs=1.0)
    source = SavSource(spec, SIZE, aspect="squash", max_pixels=MAX_PIXELS, cache_dir=None)
    pair = by_case["video_pair"]
    good_index = {f"{pair}:obj0:f0+f4": "video_pair", f"{pair}:obj0:f4": "video_pair", "npz_pair": "npz_pair"}
    return Corpus("sav", source, expected, case_of, good_index, index_cases, after_index)


# --------------------------------------------------------------------------------------- OpenImages
OPENIMAGES_CASES = {  # case -> (image kind, mask kind as in make_openimages or "truncated" / "huge", expected)
    "rgb_jpeg_half_size_mask": ("rgb", "half", OK),
    "rgb_jpeg_double_size_mask": ("rgb", "double", OK),
    "gray_jpeg_1bit_mask": ("gray", "bit", OK),
    **{
        case: (kind, "half", reason)
        for case, (kind, reason) in IMAGE_CASES.items()
        if case not in ("rgb_jpeg", "gray_jpeg", "exif_transposed_jpeg")
    },  # no size in the CSV to disagree with
    "mask_missing": ("rgb", "missing", "mask_missing"),
    "mask_png_corrupt": ("rgb", "corrupt", "mask_missing"),
    "mask_png_truncated": ("rgb", "truncated", "mask_missing"),
    "mask_png_huge_header": ("rgb", "huge", "image_too_large"),
    "empty_mask": ("rgb", "zero", "empty_mask"),
    "full_mask": ("rgb", "full", "full_mask"),
    "mask_under_min_area": ("rgb", "tiny", "mask_too_small"),  # 4 px at the image's size
    "mask_transposed": ("rgb", "transposed", "mask_aspect_mismatch"),  # 40x30 for a 60x80 image: not stretched
}
OPENIMAGES_BAD_LINES = {  # case -> CSV line, each annotation_corrupt at index time
    "row_missing_fields": mk_oi.BAD_LINES[0],
    "row_not_utf8": mk_oi.BAD_LINES[1],
    "row_unknown_class": mk_oi.BAD_LINES[2],
    "row_empty_image_id": b"e0_m04yx4_x4.png,,/m/04yx4,x4,0.1,0.5,0.2,0.6,0.9,\n",
}


def write_openimages(
    root: Path, cases: dict[str, tuple[str, str, str]], bad_lines: dict[str, bytes]
) -> tuple[dict[str, str], dict[int, str], dict[str, str]]:
    """The published layout under root (masks in a folder). Returns the spec's paths, {CSV byte offset: case}
    and {sample index: case}."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mk_oi.write_classes(root / "oidv7-class-descriptions.csv")
    lines, by_offset, by_index = [OPENIMAGES_HEADER.encode() + b"\n"], {}, {}
    pos = len(lines[0])
    bad = list(bad_lines.values())
    for n, (case, (image, mask, _)) in enumerate(cases.items()):
        written = "half" if mask in ("truncated", "huge", "transposed") else mask  # then cut, or replaced
        row = mk_oi.Case(f"{n + 1:016x}", "/m/04yx4", f"{n:02x}", image, written, None)
        line = mk_oi.csv_line(row)
        lines.append(line)
        by_offset[pos] = case
        by_index[row.index] = case
        pos += len(line)
        if n < len(bad):  # the broken rows between good ones
            lines.append(bad[n])
            pos += len(bad[n])
        _write(root / "images" / f"{row.image_id}.jpg", image_bytes(image, mk_oi.H, mk_oi.W, seed=n))
        png = mk_oi.mask_bytes(row)
        if mask == "truncated":
            png = png[: len(png) // 2]
        elif mask == "huge":
            png = huge_png()
        elif mask == "transposed":
            png = _save(Image.fromarray(np.asarray(Image.open(io.BytesIO(png))).T.copy()), "PNG")
        _write(root / "masks" / row.mask_path, png)
    lines += bad[len(cases) :]
    (root / "train-annotations-object-segmentation.csv").write_bytes(b"".join(lines))
    paths = {
        "annotations": str(root / "train-annotations-object-segmentation.csv"),
        "classes": str(root / "oidv7-class-descriptions.csv"),
        "images": str(root / "images"),
        "masks": str(root / "masks"),
    }
    return paths, by_offset, by_index


def openimages_source(paths: dict[str, str]) -> OpenImagesSource:
    spec = OpenImagesSpec(**paths, min_area=MIN_AREA["openimages"])
    return OpenImagesSource(spec, SIZE, aspect="squash", max_pixels=MAX_PIXELS, cache_dir=None)


def build_openimages(root: Path) -> Corpus:
    paths, by_offset, by_index = write_openimages(root / "openimages", OPENIMAGES_CASES, OPENIMAGES_BAD_LINES)
    expected = {case: reason for case, (_, _, reason) in OPENIMAGES_CASES.items()}
    good_index = {index: case for index, case in by_index.items() if expected[case] == OK}
    index_cases = dict.fromkeys(OPENIMAGES_BAD_LINES, "annotation_corrupt")
    return Corpus(
        "openimages", openimages_source(paths), expected, lambda key: by_offset[key[1]], good_index, index_cases
    )


# ----------------------------------------------------------------------------------------------- all
BUILDERS = {"refcoco": build_refcoco, "sa1b": build_sa1b, "sav": build_sav, "openimages": build_openimages}


def build_corpus(root: str | Path) -> dict[str, Corpus]:
    """Write every source's folder under root; {source name: Corpus}."""
    root = Path(root)
    return {name: build(root) for name, build in BUILDERS.items()}
