"""SavSource on tiny format-exact fixtures (see make_sav.py): indexing, the frames and masks it decodes,
determinism, every kind of bad data, and a SourceStream over it."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from dualrl.data.decode import BadSample
from dualrl.data.fixtures import coco_rle
from dualrl.data.loader import TrainBatches
from dualrl.data.sources.sav import SavSource
from dualrl.data.stream import Mixture, SourceStream
from dualrl.data.transforms import square
from dualrl.recipe import SavSpec
from tests.data.make_sav import (
    ANNOTATED,
    HIDDEN,
    frame_of,
    masklet,
    object_mask,
    write_json,
    write_mp4,
    write_npz,
    write_video_sample,
)

S, GAP = 32, 2


def make_source(root, **spec) -> SavSource:
    return SavSource(SavSpec(root=str(root), **{"pair_gap": GAP, "min_area": 50, **spec}), S)


def visible(obj: int, k: int) -> bool:
    return 0 <= k < ANNOTATED and (obj == 0 or (obj == 1 and k not in HIDDEN))


def expected_rows(video: int, kind: int, objects=(0, 1)) -> set[tuple]:
    return {(video, kind, j, k, int(visible(j, k + GAP))) for j in objects for k in range(ANNOTATED) if visible(j, k)}


def expected_mask(obj: int, k: int) -> torch.Tensor:
    return square(np.zeros((48, 64, 3), np.uint8), object_mask(obj, k), S)[1]


def rows(shard) -> set[tuple]:
    return {tuple(int(v) for v in row) for row in shard.rows}


def reason(source, key, seed=0) -> str:
    with pytest.raises(BadSample) as bad:
        source.load(key, seed)
    return bad.value.reason


@pytest.fixture(scope="module")
def sav_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sav_train")
    write_video_sample(root / "sav_000", "sav_000001", auto=True)
    write_video_sample(root / "sav_000", "sav_000002")
    write_video_sample(root / "sav_001", "sav_000003")
    (root / "notes").mkdir()  # no SA-V file: not a shard
    (root / "notes" / "readme.txt").write_text("hi")
    return root


# ------------------------------------------------------------------------------------------ indexing
def test_index_rows(sav_root):
    """One row per visible (video, object, annotation) with min_area; pair_ok only where k + gap is visible."""
    source = make_source(sav_root)
    assert source.shards() == ["sav_000", "sav_001"]
    shard = source.build_shard("sav_000")
    # obj2's 2x2 box is under min_area in all 10 annotations of both videos: counted, not indexed
    assert shard.names == ["sav_000001", "sav_000002"] and shard.skipped == {"mask_too_small": 20}
    assert shard.rows.dtype == np.uint32 and shard.rows.shape == (34, 5)
    assert rows(shard) == expected_rows(0, 0) | expected_rows(1, 0)

    auto = make_source(sav_root, annotations="auto").build_shard("sav_000")
    assert auto.names == ["sav_000001"] and rows(auto) == expected_rows(0, 1, objects=(0,))
    both = make_source(sav_root, annotations="both").build_shard("sav_000")
    assert rows(both) == expected_rows(0, 0) | expected_rows(0, 1, objects=(0,)) | expected_rows(1, 0)

    # obj2 (2x2 = 4 pixels) counts once min_area allows it; every annotation of it is visible
    small = make_source(sav_root, min_area=4).build_shard("sav_001")
    assert len(small) == len(expected_rows(0, 0)) + ANNOTATED


def test_shards_of_a_flat_folder_and_of_npz(sav_root, tmp_path):
    flat = make_source(sav_root / "sav_001")
    assert flat.shards() == ["."] and flat.build_shard(".").names == ["sav_000003"]
    write_npz(tmp_path / "pairs" / "b.npz")
    write_npz(tmp_path / "pairs" / "a.npz")
    write_npz(tmp_path / "c.npz")
    source = make_source(tmp_path)
    assert source.shards() == [".", "pairs"]
    shard = source.build_shard("pairs")
    assert shard.rows == 2 and shard.names == ["a.npz", "b.npz"]
    assert source.key(shard, "pairs", 1) == ("npz", str((tmp_path / "pairs" / "b.npz").resolve()))


def test_index_cache(tmp_path):
    """A cached index gives the same keys as a fresh one, for video and npz shards."""
    write_video_sample(tmp_path / "sav" / "sav_000", "sav_000001")
    write_npz(tmp_path / "sav" / "npz_pairs" / "a.npz")
    cache = tmp_path / "cache"
    source = SavSource(SavSpec(root=str(tmp_path / "sav"), pair_gap=GAP, min_area=50), S, cache_dir=str(cache))
    for shard in ("sav_000", "npz_pairs"):
        built, cached = source.shard_index(shard), source.shard_index(shard)
        assert len(built) > 0 and [source.key(built, shard, i) for i in range(len(built))] == [
            source.key(cached, shard, i) for i in range(len(cached))
        ]
    assert len(list((cache / "sav").glob("*.npz"))) == 2


# ------------------------------------------------------------------------------------------- loading
def test_load_single_frames(sav_root):
    source = make_source(sav_root, pairs=0.0)
    shard = source.build_shard("sav_000")
    for i in range(len(shard)):
        video, _, obj, k, _ = (int(v) for v in shard.rows[i])
        sample = source.load(source.key(shard, "sav_000", i), seed=i)
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, S, S)
        assert sample["mask"].dtype == torch.bool and sample["mask"].shape == (S, S)
        assert frame_of(sample["image"]) == 4 * k
        assert torch.equal(sample["mask"], expected_mask(obj, k))
        assert "seg_image" not in sample and sample["source"] == "sav" and sample["expression"] is None
        assert sample["index"] == f"{shard.names[video]}:obj{obj}:f{4 * k}"


def test_load_pairs(sav_root):
    source = make_source(sav_root, pairs=1.0, annotations="both")
    shard = source.build_shard("sav_000")
    pairs = 0
    for i in range(len(shard)):
        _, kind, obj, k, pair_ok = (int(v) for v in shard.rows[i])
        sample = source.load(source.key(shard, "sav_000", i), seed=i)
        assert frame_of(sample["image"]) == 4 * k and torch.equal(sample["mask"], expected_mask(obj, k))
        assert ("seg_image" in sample) == bool(pair_ok)
        if pair_ok:
            pairs += 1
            assert sample["seg_image"].dtype == torch.uint8 and sample["seg_image"].shape == (3, S, S)
            assert sample["seg_mask"].dtype == torch.bool and sample["seg_mask"].shape == (S, S)
            assert frame_of(sample["seg_image"]) == 4 * (k + GAP)
            assert torch.equal(sample["seg_mask"], expected_mask(obj, k + GAP))
            assert sample["index"].endswith(f"f{4 * k}+f{4 * (k + GAP)}")
        assert (":auto:" in sample["index"]) == (kind == 1)
    assert pairs == sum(row[4] for row in expected_rows(0, 0) | expected_rows(0, 1, (0,)) | expected_rows(1, 0)) == 30


def test_every_frame_decodes_right(tmp_path):
    """Seeking and skipping non-reference frames give the exact frame, wherever the keyframes are."""
    path = str(write_mp4(tmp_path / "sav_000030.mp4", gop=7))
    source = make_source(tmp_path)
    for n in range(40):
        frames = [n, min(n + 5, 39)] if n < 39 else [n]
        assert [frame_of(image) for image in source._read_frames(path, frames, (48, 64))] == frames


def test_load_npz(tmp_path):
    source = make_source(tmp_path)
    path = write_npz(tmp_path / "p.npz", frame1=3, frame2=7)
    sample = source.load(("npz", str(path)), seed=0)
    assert frame_of(sample["image"]) == 3 and frame_of(sample["seg_image"]) == 7
    assert torch.equal(sample["mask"], expected_mask(0, 0)) and torch.equal(sample["seg_mask"], expected_mask(0, 5))
    assert sample["index"] == "p"


def test_same_key_and_seed_same_sample(sav_root):
    source = make_source(sav_root, pairs=0.5)
    shard = source.build_shard("sav_000")
    key = next(source.key(shard, "sav_000", i) for i in range(len(shard)) if shard.rows[i, 4] and shard.rows[i, 3] > 2)
    copy = pickle.loads(pickle.dumps(source))  # what a loader worker gets
    kinds = set()
    for seed in range(16):
        a, b = source.load(key, seed), copy.load(key, seed)
        assert a["index"] == b["index"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a.get("seg_image", a["image"]), b.get("seg_image", b["image"]))
        kinds.add("seg_image" in a)
    assert kinds == {True, False}  # pairs: 0.5 gives both


# ------------------------------------------------------------------------------------------ bad data
def test_bad_videos_and_annotations(sav_root, tmp_path):
    folder = tmp_path / "sav_000"
    good = write_video_sample(folder, "sav_000010")
    write_json(folder / "sav_000011_manual.json", "sav_000011", masklet())  # no mp4
    write_mp4(folder / "sav_000012.mp4")
    (folder / "sav_000012_manual.json").write_text('{"video_id": "sav_000012", "masklet": [[{"size"')
    write_mp4(folder / "sav_000013.mp4")
    (folder / "sav_000013_manual.json").write_text(json.dumps({"video_id": "sav_000013"}))  # no masklet
    broken = masklet()
    broken[0][0] = {"size": [48, 64], "counts": "!!not rle"}
    broken[1][0] = {"size": [48, 64], "counts": 7}
    write_video_sample(folder, "sav_000014")
    write_json(folder / "sav_000014_manual.json", "sav_000014", broken)
    data = good.read_bytes()
    (folder / "sav_000015.mp4").write_bytes(data[: int(len(data) * 0.3)])
    write_json(folder / "sav_000015_manual.json", "sav_000015", masklet())
    (folder / "sav_000016.mp4").write_text("not a video at all\n" * 50)
    write_json(folder / "sav_000016_manual.json", "sav_000016", masklet())
    write_mp4(folder / "sav_000017.mp4")
    write_json(folder / "sav_000017_manual.json", "sav_000017", masklet(1, height=24, width=32))
    write_mp4(folder / "sav_000018.mp4")  # RLE of a 40x64 mask labelled 48x64: well-formed, wrong run sum
    write_json(
        folder / "sav_000018_manual.json",
        "sav_000018",
        [[{"size": [48, 64], "counts": coco_rle(object_mask(0, k, 40, 64))["counts"]}] for k in range(ANNOTATED)],
    )

    source = make_source(tmp_path, pairs=0.0)
    shard = source.build_shard("sav_000")
    # the truncated video (its moov box gone) and the text file cannot be opened: skipped while indexing
    skipped = {"video_missing": 1, "video_corrupt": 2, "annotation_corrupt": 2, "bad_rle": 2, "mask_too_small": 20}
    assert shard.skipped == skipped
    assert shard.names == ["sav_000010", "sav_000014", "sav_000017", "sav_000018"]
    assert rows(shard) >= expected_rows(0, 0)
    assert {(j, k) for v, _, j, k, _ in rows(shard) if v == 1} == {(j, k) for _, _, j, k, _ in expected_rows(1, 0)} - {
        (0, 0),
        (0, 1),
    }  # the two bad entries of sav_000014 are skipped, the rest of it kept
    first = {shard.names[int(row[0])]: source.key(shard, "sav_000", i) for i, row in enumerate(shard.rows)}
    assert reason(source, first["sav_000017"]) == "mask_size_mismatch"
    assert reason(source, first["sav_000018"]) == "bad_rle"
    good.unlink()
    assert reason(source, first["sav_000010"]) == "video_missing"
    _, video, annotations, obj, _, _ = first["sav_000014"]  # an annotation the JSON does not have
    assert reason(source, ("video", video, annotations, obj, ANNOTATED + 5, 0)) == "annotation_corrupt"


def test_video_shorter_than_its_masklet_is_skipped_while_indexing(tmp_path):
    """20 frames annotated every 4th make 5 annotations, the JSON has 10: the whole masklet is skipped."""
    write_video_sample(tmp_path, "sav_000020", frames=20)
    shard = make_source(tmp_path, pairs=1.0).build_shard(".")
    assert len(shard) == 0 and shard.skipped == {"masklet_mismatch": 1}


def test_bad_npz(tmp_path):
    source = make_source(tmp_path)
    assert reason(source, ("npz", str(write_npz(tmp_path / "a.npz", drop="mask2")))) == "annotation_corrupt"
    assert reason(source, ("npz", str(write_npz(tmp_path / "b.npz", mask_hw=(24, 32))))) == "mask_size_mismatch"
    (tmp_path / "c.npz").write_text("not a zip")
    assert reason(source, ("npz", str(tmp_path / "c.npz"))) == "annotation_corrupt"
    assert reason(source, ("npz", str(tmp_path / "gone.npz"))) == "video_missing"


# ------------------------------------------------------------------------------------------ streaming
def test_source_stream_and_batches(sav_root):
    stream = SourceStream(make_source(sav_root, pairs=0.5), seed=0, max_samples=5)
    assert stream.size() == 5
    epoch = [stream.key(c) for c in range(5)]
    assert len(set(epoch)) == 5 and set(epoch) == {stream.key(c) for c in range(5, 10)}
    batches = TrainBatches([stream], Mixture([stream], [1.0], seed=0), batch_size=4)
    batch = next(batches)
    assert batch["images"].shape == (4, 3, S, S) and batch["masks"].shape == (4, S, S)
    assert batch["source"] == ["sav"] * 4 and batches.skipped() == {"mask_too_small": 20}  # obj2, at index time
