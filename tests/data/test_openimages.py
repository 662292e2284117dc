"""OpenImages v7 segmentation source: lean byte-offset index, loading from a folder or zips, bad data skipped."""

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dualrl.data.decode import BadSample
from dualrl.data.sources.openimages import OpenImagesSource, ZipTable, read_classes
from dualrl.data.stream import SourceStream
from dualrl.recipe import OpenImagesSpec
from tests.data import make_openimages as mk

SIZE = 80  # with aspect="pad", an 80x60 image is not resized: the mask can be compared pixel for pixel


def make_source(paths: dict, **kw) -> OpenImagesSource:
    spec = OpenImagesSpec(**paths, min_area=mk.MIN_AREA)
    return OpenImagesSource(spec, SIZE, aspect="pad", max_pixels=mk.MAX_PIXELS, **kw)


def all_keys(src: OpenImagesSource) -> list[tuple]:
    keys = []
    for shard in src.shards():
        index = src.build_shard(shard)
        keys += [src.key(index, shard, i) for i in range(len(index))]
    return keys


def outcome(src: OpenImagesSource, key: tuple):
    try:
        return src.load(key, 0)
    except BadSample as bad:
        return bad.reason


@pytest.fixture(params=["folder", "zip"])
def layout(request, tmp_path):
    return mk.make_openimages(tmp_path, zipped=request.param == "zip")


def test_index_rows_point_at_their_lines(tmp_path):
    paths = mk.make_openimages(tmp_path)
    src = make_source(paths)
    assert src.shards() == ["0"]
    shard = src.build_shard("0")
    assert shard.rows.dtype == np.uint64 and shard.names == []
    assert len(shard) == len(mk.CASES)
    assert shard.skipped == {"annotation_corrupt": len(mk.BAD_LINES)}
    data = Path(paths["annotations"]).read_bytes()
    expected = [data.index(b"\n" + c.mask_path.encode()) + 1 for c in mk.CASES]
    keys = [src.key(shard, "0", i) for i in range(len(shard))]
    assert [off for _, off in keys] == expected
    assert all(Path(path) == Path(paths["annotations"]) for path, _ in keys)


def test_classes_tolerate_quotes_and_bad_bytes(tmp_path):
    paths = mk.make_openimages(tmp_path)
    assert read_classes(paths["classes"]) == mk.CLASSES


def test_load_good_and_bad(layout):
    """Every case gives its expected sample or skip reason, in the folder layout and the zip layout."""
    src = make_source(layout)
    data = Path(layout["annotations"]).read_bytes()
    by_offset = {data.index(b"\n" + c.mask_path.encode()) + 1: c for c in mk.CASES}
    got = {by_offset[key[1]]: outcome(src, key) for key in all_keys(src)}
    assert {c.index: out if isinstance(out, str) else None for c, out in got.items()} == {
        c.index: c.expect for c in mk.CASES
    }
    for case in mk.GOOD:
        sample = got[case]
        assert sample["source"] == "openimages" and sample["index"] == case.index
        assert sample["expression"] is None and sample["references"] == []
        assert sample["weak_references"] == [mk.CLASSES[case.label]] and sample["label"] == case.label
        image, mask = sample["image"], sample["mask"].numpy()
        assert image.shape == (3, SIZE, SIZE) and str(image.dtype) == "torch.uint8"
        assert np.array_equal(mask[: mk.H], case.region()), case  # nearest resize, up and down
        assert not mask[mk.H :].any()  # padding
        pixels = image[:, : mk.H].numpy().astype(int)
        if case.image == "gray":
            assert abs(pixels - 200).max() <= 2
        if case.image == "16bit":
            assert abs(pixels - 128).max() <= 1  # 0x8000 scaled to 8 bits
        if case.image == "rgba":
            assert np.array_equal(pixels[2], np.full_like(pixels[2], 90))


def test_load_is_deterministic(layout):
    src = make_source(layout)
    key = all_keys(src)[0]
    a, b = src.load(key, 0), src.load(key, 123)
    assert a["index"] == b["index"] and (a["image"] == b["image"]).all() and (a["mask"] == b["mask"]).all()


@pytest.mark.parametrize("shard_bytes", [1, 13, 100, 333, 1 << 20])
def test_shards_cover_every_row_once(tmp_path, shard_bytes):
    paths = mk.make_openimages(tmp_path)
    whole = make_source(paths)
    split = make_source(paths, shard_bytes=shard_bytes)
    size = Path(paths["annotations"]).stat().st_size
    assert len(split.shards()) == -(-size // shard_bytes)
    offsets, skipped = [], 0
    for shard in split.shards():
        index = split.build_shard(shard)
        offsets += [split.key(index, shard, i)[1] for i in range(len(index))]
        skipped += index.skipped.get("annotation_corrupt", 0)
    assert offsets == [key[1] for key in all_keys(whole)]
    assert skipped == len(mk.BAD_LINES)


def test_missing_zip_and_corrupt_zip(tmp_path):
    paths = mk.make_openimages(tmp_path, cases=mk.GOOD, zipped=True)
    src = make_source(paths)
    keys = all_keys(src)
    for zip_path in Path(paths["masks"]).glob("train-masks-f.zip"):
        zip_path.write_bytes(b"not a zip")
    (Path(paths["masks"]) / "train-masks-0.zip").unlink()
    reasons = [outcome(src, key) for key in keys]
    assert [r for r in reasons if isinstance(r, str)] == ["mask_missing"] * 4  # two in 0.zip, two in f.zip
    assert sum(isinstance(r, dict) for r in reasons) == 1  # the one in a.zip


def test_stream_cache_and_pickle(tmp_path):
    paths = mk.make_openimages(tmp_path / "data", cases=mk.GOOD, zipped=True)
    cache = tmp_path / "cache"
    src = make_source(paths, shard_bytes=150, cache_dir=str(cache))
    stream = SourceStream(src, seed=3, max_samples=3)
    keys = [stream.key(c) for c in range(6)]
    assert stream.size() == 3 and len(set(keys[:3])) == 3 and set(keys[3:]) == set(keys[:3])
    samples = [src.load(k, 0) for k in keys[:3]]
    assert all(s["mask"].any() for s in samples)
    assert list(cache.glob("openimages/*.npz"))

    again = SourceStream(make_source(paths, shard_bytes=150, cache_dir=str(cache)), seed=3, max_samples=3)
    assert [again.key(c) for c in range(6)] == keys  # read back from the cache

    assert src._zips  # opened while loading; not pickled
    clone = pickle.loads(pickle.dumps(src))
    assert clone._zips == {}
    assert (clone.load(keys[0], 0)["mask"] == samples[0]["mask"]).all()


def test_cache_key_follows_the_files(tmp_path):
    paths = mk.make_openimages(tmp_path)
    src = make_source(paths)
    before = src.shard_stamp("0")
    with open(paths["annotations"], "ab") as f:
        f.write(mk.csv_line(mk.GOOD[0]))
    assert src.shard_stamp("0") != before
    assert len(src.build_shard("0")) == len(mk.CASES) + 1


# ------------------------------------------------------------------------------------------ zip members
MEMBERS = {  # name -> (bytes, method)
    "a.png": (os.urandom(300), zipfile.ZIP_STORED),
    "b.png": (b"mask " * 400, zipfile.ZIP_DEFLATED),
    "dir/c.png": (os.urandom(50) + bytes(2000), zipfile.ZIP_DEFLATED),
    "empty.png": (b"", zipfile.ZIP_STORED),
    "empty-deflated.png": (b"", zipfile.ZIP_DEFLATED),
    "caf\u00e9.png": (b"\x89PNG not really", zipfile.ZIP_STORED),  # a UTF-8 name
}


def write_zip(path: Path, members: dict = MEMBERS, force_zip64: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for name, (data, method) in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type, info.file_size = method, len(data)  # the size decides on zip64, as in writestr
            with zf.open(info, "w", force_zip64=force_zip64) as f:
                f.write(data)
    return path


def data_start(path: Path, name: str) -> int:
    """Where a member's (compressed) bytes start in the file, from its local header."""
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(name).header_offset
    head = path.read_bytes()[offset : offset + 30]
    return offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")


def test_zip_table_reads_stored_and_deflated(tmp_path):
    path = write_zip(tmp_path / "m.zip")
    table = ZipTable(path)
    with zipfile.ZipFile(path) as zf:
        assert {i.filename: i.compress_type for i in zf.infolist()} == {n: m for n, (_, m) in MEMBERS.items()}
        for name, (data, _) in MEMBERS.items():
            assert table.read(name) == zf.read(name) == data, name
    assert table.names.dtype.kind == "S" and list(table.names) == sorted(n.encode() for n in MEMBERS)
    for absent in ("c.png", "dir/", "a.pn", "a.png.", "zzz", "", "x" * 200):
        assert table.read(absent) is None, absent


def test_zip_table_last_duplicate_wins(tmp_path):
    path = tmp_path / "dup.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", b"first")
        zf.writestr("b.png", b"other")
        zf.writestr("a.png", b"second", zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as zf:
        assert ZipTable(path).read("a.png") == zf.read("a.png") == b"second"


def test_zip_table_reads_zip64(tmp_path, monkeypatch):
    """Zip64 members (forced), and a zip64 directory: with the limits lowered, every offset and size is
    written to zip64 extra fields and the end record is the zip64 one."""
    forced = write_zip(tmp_path / "forced.zip", force_zip64=True)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    big = {
        f"{k:03d}.png": (bytes([k]) * (k * 37), zipfile.ZIP_DEFLATED if k % 2 else zipfile.ZIP_STORED)
        for k in range(1, 8)
    }
    zip64 = write_zip(tmp_path / "zip64.zip", {**MEMBERS, **big})
    monkeypatch.undo()
    assert b"PK\x06\x06" in zip64.read_bytes()  # the zip64 end of central directory record
    for path, members in ((forced, MEMBERS), (zip64, {**MEMBERS, **big})):
        table = ZipTable(path)
        with zipfile.ZipFile(path) as zf:
            for name, (data, _) in members.items():
                assert table.read(name) == zf.read(name) == data, (path.name, name)


@pytest.mark.parametrize("name", ["a.png", "b.png", "dir/c.png"])
@pytest.mark.parametrize("where", ["data", "header"])
def test_zip_table_corrupt_member(tmp_path, name, where):
    """Flipped bytes inside a member's data (or its local header) -> mask_missing naming it, not wrong bytes."""
    path = write_zip(tmp_path / "m.zip")
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    if where == "data":  # the middle half of its compressed bytes
        start = data_start(path, name) + info.compress_size // 4
        for k in range(start, start + max(1, info.compress_size // 2)):
            raw[k] ^= 0x55
    else:
        raw[info.header_offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    table = ZipTable(path)  # the central directory is intact
    with pytest.raises(BadSample) as bad:
        table.read(name)
    assert bad.value.reason == "mask_missing" and name in bad.value.detail
    others = [n for n in MEMBERS if n != name]
    assert [table.read(n) for n in others] == [MEMBERS[n][0] for n in others]


def test_zip_table_truncated_file(tmp_path):
    path = write_zip(tmp_path / "m.zip")
    table = ZipTable(path)
    path.write_bytes(path.read_bytes()[: data_start(path, "b.png") + 3])  # cut after it was indexed
    with pytest.raises(BadSample, match=r"mask_missing.*b\.png"):
        table.read("b.png")


def test_corrupt_member_in_source(tmp_path):
    """Through `load`: one mask PNG with flipped bytes inside its zip is skipped as mask_missing."""
    paths = mk.make_openimages(tmp_path, cases=mk.GOOD, zipped=True)
    case = mk.GOOD[0]
    path = Path(paths["masks"]) / f"train-masks-{case.image_id[0]}.zip"
    raw = bytearray(path.read_bytes())
    start = data_start(path, case.mask_path)
    raw[start + 40 : start + 48] = bytes(b ^ 0xA5 for b in raw[start + 40 : start + 48])
    path.write_bytes(bytes(raw))
    src = make_source(paths)
    data = Path(paths["annotations"]).read_bytes()
    by_offset = {data.index(b"\n" + c.mask_path.encode()) + 1: c for c in mk.GOOD}
    got = {by_offset[key[1]].index: outcome(src, key) for key in all_keys(src)}
    assert got.pop(case.index) == "mask_missing"
    assert all(isinstance(out, dict) for out in got.values())


def test_zip_tables_survive_a_fork(tmp_path):
    """A forked child reuses the parent's table but opens the zip again (a shared handle shares its offset)."""
    paths = mk.make_openimages(tmp_path, cases=mk.GOOD, zipped=True)
    src = make_source(paths)
    keys = all_keys(src)
    src.load(keys[0], 0)
    (table,) = src._zips.values()
    parent_file = table._file
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when it read the mask through a handle of its own
        try:
            ok = (
                src.load(keys[0], 0)["mask"].any() and table._file is not parent_file and src._zips[table.path] is table
            )
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert table._file is parent_file and src.load(keys[0], 0)["mask"].any()
