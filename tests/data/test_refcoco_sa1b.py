"""RefCOCO and SA-1B sources on format-exact fixtures, good and broken."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from dualrl.data.decode import BadSample
from dualrl.data.fixtures import coco_rle, py2_pickle, write_sa1b_record
from dualrl.data.sources.refcoco import RefCocoSource, load_refs
from dualrl.data.sources.sa1b import Sa1bSource
from dualrl.data.stream import DataError, SourceStream
from dualrl.recipe import RefCocoSpec, Sa1bSpec
from tests.data.make_refcoco import make_refcoco
from tests.data.make_sa1b import annotation, boxes_image, make_sa1b


def _refcoco(tmp_path, split="train", **spec):
    root, images = make_refcoco(tmp_path)
    return RefCocoSource(RefCocoSpec(root=str(root), images=str(images), **spec), size=32, split=split)


def _all(source):
    stream = SourceStream(source, seed=0)
    return [stream.key(i) for i in range(stream.size())], stream


def test_refcoco_reads_python2_pickle_polygons_and_rle(tmp_path):
    source = _refcoco(tmp_path)
    keys, stream = _all(source)
    assert len(keys) == 2 and stream.skipped == {}
    by_ref = {k[-1]: source.load(k, seed=1) for k in keys}
    first = by_ref[0]
    assert first["references"] == ["left square", "the box on the left"]  # py2 str and unicode alike
    assert first["expression"] in first["references"] and first["source"] == "refcoco"
    assert first["image"].shape == (3, 32, 32) and first["mask"].dtype == torch.bool
    # the 20x20 square of a 64x48 image squashed to 32x32: 10 x ~13.3 pixels
    assert 110 <= int(first["mask"].sum()) <= 150
    assert by_ref[1]["mask"].any()  # two-part polygon, one part a triangle
    val = _refcoco(tmp_path / "v", split="val")
    (key,), _ = _all(val)
    sample = val.load(key, 0)
    assert sample["references"] == ["the crowd stripe"] and sample["mask"].any()  # uncompressed RLE


def test_refcoco_expression_is_a_seeded_choice(tmp_path):
    source = _refcoco(tmp_path)
    key = next(k for k in _all(source)[0] if k[-1] == 0)
    picks = {source.load(key, seed)["expression"] for seed in range(20)}
    assert picks == {"left square", "the box on the left"}
    assert source.load(key, 3)["expression"] == source.load(key, 3)["expression"]


def test_restricted_unpickler_refuses_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"x": Evil()}], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refused: the pickle names \S*print"):
        load_refs(path)
    path.write_bytes(py2_pickle([{b"a": [1, 2.5, None, b"x"]}]))
    assert load_refs(path) == [{"a": [1, 2.5, None, b"x"]}]


def test_refcoco_bad_refs_are_counted_at_index_time(tmp_path):
    root, images = make_refcoco(tmp_path)
    refs = load_refs(root / "refcoco" / "refs(unc).p")
    refs += [
        {"ref_id": 7, "ann_id": 999, "image_id": 9, "split": "train", "sentences": []},  # unknown annotation
        {
            "ref_id": 8,
            "ann_id": 1,
            "image_id": 9,
            "split": "train",
            "sentences": [{"sent": b"\xff\xfe bad", "raw": b"\xff"}, {"sent": "   ", "raw": ""}],
        },  # no usable text
    ]
    raw = [{k.encode(): v for k, v in r.items()} for r in refs]
    for r in raw:
        r[b"sentences"] = [{k.encode() if isinstance(k, str) else k: v for k, v in s.items()} for s in r[b"sentences"]]
    (root / "refcoco" / "refs(unc).p").write_bytes(py2_pickle(raw))
    source = RefCocoSource(RefCocoSpec(root=str(root), images=str(images)), size=32)
    keys, stream = _all(source)
    assert len(keys) == 2 and stream.skipped == {"annotation_corrupt": 1, "bad_text": 1}


def test_refcoco_broken_files(tmp_path):
    root, images = make_refcoco(tmp_path)
    (root / "refcoco" / "instances.json").write_text("{not json")
    source = RefCocoSource(RefCocoSpec(root=str(root), images=str(images)), size=32)
    stream = SourceStream(source, 0)
    with pytest.raises(DataError, match=r"no usable sample.*annotation_corrupt 1"):
        stream.key(0)


def test_refcoco_missing_and_wrong_images(tmp_path):
    source = _refcoco(tmp_path)
    keys, _ = _all(source)
    key = keys[0]
    (tmp_path / "train2014" / key[0].split("/")[-1]).unlink()
    with pytest.raises(BadSample) as err:
        source.load(key, 0)
    assert err.value.reason == "image_missing"
    # annotation says 48x64 but the file is 64x48 (e.g. EXIF-rotated copy): refused, not silently misaligned
    from PIL import Image

    Image.new("RGB", (48, 64)).save(key[0])
    with pytest.raises(BadSample) as err:
        source.load(key, 0)
    assert err.value.reason == "mask_size_mismatch"


# ------------------------------------------------------------------------------------------ SA-1B
def _sa1b(root, **spec):
    return Sa1bSource(Sa1bSpec(root=str(root), **{"min_area": 100, **spec}), size=32)


def test_sa1b_one_sample_per_annotation_above_min_area(tmp_path):
    source = _sa1b(make_sa1b(tmp_path / "sa", images=3))
    keys, stream = _all(source)
    assert len(keys) == 6 and stream.skipped == {"mask_too_small": 3}  # the 4x4 masks
    sample = source.load(keys[0], 0)
    assert sample["expression"] is None and sample["references"] == [] and sample["source"] == "sa1b"
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].any()


def test_sa1b_masks_match_their_annotation(tmp_path):
    image, masks = boxes_image(40, 40, [(0, 0, 20, 20), (20, 20, 40, 40)])
    write_sa1b_record(tmp_path / "sa", 5, image, [annotation(1, masks[0]), annotation(2, masks[1])])
    source = Sa1bSource(Sa1bSpec(root=str(tmp_path / "sa"), min_area=1), size=40)
    keys, _ = _all(source)
    got = sorted((source.load(k, 0)["mask"].numpy().nonzero()[0].min(), k[1]) for k in keys)
    assert [g[0] for g in got] == [0, 20]


def test_sa1b_sharded_folders_and_flat_runs(tmp_path):
    root = tmp_path / "sa"
    make_sa1b(root / "sa_000000", images=2)
    make_sa1b(root / "sa_000001", images=2, seed=5)
    make_sa1b(root, images=3, seed=9)
    source = _sa1b(root, files_per_shard=2)
    assert source.shards() == ["sa_000000", "sa_000001", "flat:0", "flat:1"]
    keys, _ = _all(source)
    assert len(keys) == 14 and len(set(keys)) == 14


def test_sa1b_index_is_cached(tmp_path):
    root = make_sa1b(tmp_path / "sa", images=2)
    source = Sa1bSource(Sa1bSpec(root=str(root), min_area=100), size=32, cache_dir=str(tmp_path / "cache"))
    first = source.shard_index("flat:0")
    assert list((tmp_path / "cache" / "sa1b").glob("*.npz"))
    source.build_shard = None  # a second read must come from the cache
    again = source.shard_index("flat:0")
    assert np.array_equal(first.rows, again.rows) and first.names == again.names
    assert again.skipped == {"mask_too_small": 2}


def test_sa1b_bad_data(tmp_path):
    root = tmp_path / "sa"
    image, masks = boxes_image(48, 64, [(2, 2, 18, 18)])
    good = annotation(1, masks[0])
    full = annotation(2, np.ones((48, 64), bool))
    garbage = {**good, "id": 3, "segmentation": {"size": [48, 64], "counts": "PPPPP"}}  # decodes to garbage
    wrong_size = {**good, "id": 4, "segmentation": coco_rle(np.pad(masks[0], ((0, 2), (0, 0))))}
    no_seg = {"id": 5, "area": 500}
    write_sa1b_record(root, 1, image, [good, full, garbage, wrong_size, no_seg])
    write_sa1b_record(root, 2, image, [good])
    (root / "sa_2.jpg").write_bytes((root / "sa_2.jpg").read_bytes()[:300])  # truncated JPEG
    write_sa1b_record(root, 3, image, [good])
    (root / "sa_3.jpg").unlink()  # missing image
    write_sa1b_record(root, 4, image, [good])
    (root / "sa_4.json").write_text('{"image": {"height": 48')  # corrupt JSON
    write_sa1b_record(root, 6, image, [good])
    (root / "sa_6.jpg").write_bytes(b"this is not a jpeg")
    source = _sa1b(root)
    keys, stream = _all(source)
    assert stream.skipped == {"annotation_corrupt": 1, "image_missing": 1}
    reasons = {}
    for key in keys:
        try:
            source.load(key, 0)
            reasons[key[1], key[0][-4:]] = "ok"
        except BadSample as bad:
            reasons[key[1], key[0][-4:]] = bad.reason
    assert reasons == {
        (0, "sa_1"): "ok",
        (1, "sa_1"): "full_mask",
        (2, "sa_1"): "bad_rle",
        (3, "sa_1"): "mask_size_mismatch",
        (4, "sa_1"): "annotation_corrupt",
        (0, "sa_2"): "image_corrupt",
        (0, "sa_6"): "image_corrupt",
    }


def test_sa1b_image_checks(tmp_path):
    from PIL import Image

    root = tmp_path / "sa"
    image, masks = boxes_image(48, 64, [(2, 2, 18, 18)])
    write_sa1b_record(root, 1, image, [annotation(1, masks[0])])
    source = Sa1bSource(Sa1bSpec(root=str(root), min_area=1), size=32, max_pixels=1000)
    (key,), _ = _all(source)
    with pytest.raises(BadSample) as err:
        source.load(key, 0)
    assert err.value.reason == "image_too_large"
    Image.fromarray(image[..., 0]).save(root / "sa_1.jpg")  # grayscale JPEG
    sample = _sa1b(root, min_area=1).load(key, 0)
    assert sample["image"].shape == (3, 32, 32) and (sample["image"][0] == sample["image"][1]).all()
