"""SA-V annotations checked against their video while indexing: a masklet annotates every 4th frame of a
24 fps video (annotation k = frame 4k), so it holds ceil(frames / 4) annotated frames, the same objects in
each, at the video's size. Whatever disagrees is skipped, counted under its reason and logged once; a
malformed RLE of area 0 is a bad RLE, not an object out of view."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dualrl.data.sources.sav import SavSource, probe
from dualrl.data.stream import SourceStream
from dualrl.recipe import SavSpec

H, W = 32, 48
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


# ------------------------------------------------------------------------------------------- fixtures
def write_mp4(path: Path, frames: int = 8, fps: int = 24, height: int = H, width: int = W) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 10 * i, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


BOX = np.zeros((H, W), bool)
BOX[4:20, 6:30] = True  # 384 px
SEEN = rle(BOX)
OUT_OF_VIEW = rle(np.zeros((H, W), bool))
AREA_0_WRONG_RUNS = {"size": [H, W], "counts": rle(np.zeros((H - 8, W), bool))["counts"]}  # runs sum to 24*48


def write_video(folder: Path, stem: str, masklet: list, frames: int = 8, fps: int = 24, json_hw=(H, W)) -> None:
    """<stem>.mp4 and <stem>_manual.json with SA-V's fields (numbers as floats, like the release)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(folder / f"{stem}.mp4", frames, fps)
    doc = {
        "video_id": stem,
        "video_frame_count": float(frames),
        "video_height": float(json_hw[0]),
        "video_width": float(json_hw[1]),
        "masklet": masklet,
        "masklet_num": len(masklet[0]) if masklet else 0,
    }
    (folder / f"{stem}_manual.json").write_text(json.dumps(doc))


def source(root: Path) -> SavSource:
    return SavSource(SavSpec(root=str(root), min_area=20, pair_gap=1), size=16)


# ------------------------------------------------------------------------------------------------ tests
def test_masklets_that_disagree_with_their_video_are_counted(tmp_path, caplog):
    folder = tmp_path / "sav_000"
    write_video(folder, "sav_000001", [[SEEN], [SEEN]])  # 8 frames: annotations 0, 4
    write_video(folder, "sav_000002", [[SEEN], [SEEN], [SEEN]], frames=10)  # 10 frames: 0, 4, 8 (ceil)
    write_video(folder, "sav_000003", [[SEEN], [SEEN], [SEEN]])  # one annotation past the video's end
    write_video(folder, "sav_000004", [[SEEN]])  # the video's second half unannotated
    write_video(folder, "sav_000005", [[SEEN], [SEEN, SEEN]])  # an object appears from nowhere
    write_video(folder, "sav_000006", [[SEEN], [SEEN]], fps=30)  # annotation k would not be frame 4k
    write_video(folder, "sav_000007", [[SEEN], [SEEN]], json_hw=(H // 2, W // 2))  # JSON size not the video's
    write_video(folder, "sav_000008", [[AREA_0_WRONG_RUNS], [SEEN]])  # malformed, area 0: not out of view
    write_video(folder, "sav_000009", [[OUT_OF_VIEW], [SEEN]])  # well-formed, area 0: out of view
    with caplog.at_level(logging.WARNING):
        shard = source(tmp_path).build_shard("sav_000")
    messages = [r.getMessage() for r in caplog.records]
    stream = SourceStream(source(tmp_path), seed=0)
    size = stream.size()
    assert shard.names == ["sav_000001", "sav_000002", "sav_000008", "sav_000009"]
    assert shard.skipped == {"masklet_mismatch": 3, "video_frame_rate": 1, "mask_size_mismatch": 1, "bad_rle": 1}
    assert stream.skipped == shard.skipped and size == len(shard) == 2 + 3 + 1 + 1
    rows = {(shard.names[v], k) for v, _, _, k, _ in shard.rows}
    assert ("sav_000008", 0) not in rows and ("sav_000008", 1) in rows and ("sav_000009", 0) not in rows
    for reason in shard.skipped:  # each reason logged once, with the file
        logged = [m for m in messages if f"({reason})" in m]
        assert len(logged) == 1 and "sav_0000" in logged[0], reason


def test_probe_reads_the_header_without_decoding(tmp_path):
    write_mp4(tmp_path / "a.mp4", frames=10, fps=30)
    video = probe(tmp_path / "a.mp4")
    assert (video.frames, video.fps, video.height, video.width) == (10, 30, H, W)


@pytest.mark.parametrize(("size", "reason"), [((None, None), None), (("tall", 48), "annotation_corrupt")])
def test_json_without_a_size_or_with_a_bad_one(tmp_path, size, reason):
    """Without video_height/video_width the RLEs are checked against the video when loaded; a size that is not
    a number is a corrupt annotation."""
    folder = tmp_path / "sav_000"
    write_video(folder, "sav_000001", [[SEEN], [SEEN]])
    path = folder / "sav_000001_manual.json"
    doc = json.loads(path.read_text())
    doc["video_height"], doc["video_width"] = size
    path.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    shard = source(tmp_path).build_shard("sav_000")
    assert shard.skipped == ({reason: 1} if reason else {}) and len(shard) == (0 if reason else 2)
