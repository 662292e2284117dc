"""RefCOCO's refs pickles, hostile or odd: the restricted reader is linear in the file, bounded in depth and
size, turns every failure into one counted `annotation_corrupt`, and loads Python 3 `bytes` in protocol 2.
Sentences that are not text are dropped and counted (`bad_sentence`), never silently.

Every pickle here is written byte by byte (opcodes as `pickletools` names them), so the test says exactly
what the file holds."""

from __future__ import annotations

import json
import logging
import pickle
import resource
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from dualrl.data.decode import clean_text
from dualrl.data.sources import plain_pickle
from dualrl.data.sources.plain_pickle import MAX_DEPTH, plain_tree
from dualrl.data.sources.refcoco import RefCocoSource, load_refs
from dualrl.recipe import RefCocoSpec

ROOT = Path(__file__).resolve().parents[2]
PROTO2 = b"\x80\x02"


# ------------------------------------------------------------------------------------------- fixtures
def binunicode(text: str) -> bytes:
    """BINUNICODE as Python 2 wrote `unicode`: UTF-8 with surrogates passed through."""
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def py2(obj) -> bytes:
    """An object as Python 2's cPickle wrote it in protocol 2, without the leading PROTO and final STOP:
    bytes as `str` (SHORT_BINSTRING), str as `unicode`, ints as BININT."""
    if isinstance(obj, bytes):
        return b"U" + bytes([len(obj)]) + obj
    if isinstance(obj, str):
        return binunicode(obj)
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, list):
        return b"](" + b"".join(py2(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(py2(k) + py2(v) for k, v in obj.items()) + b"u"
    raise TypeError(type(obj))


def ref(ref_id: int, sentences: list, split: bytes = b"train") -> dict:
    return {
        b"ref_id": ref_id,
        b"ann_id": 1,
        b"image_id": 1,
        b"split": split,
        b"sentences": [{b"sent": s, b"raw": s} for s in sentences],
    }


def write_refer(root: Path, refs_pickle: bytes) -> RefCocoSource:
    """A refer folder: one 48x64 image with one square annotation, and `refs(unc).p` holding `refs_pickle`."""
    folder = root / "refcoco"
    folder.mkdir(parents=True)
    coco = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 48, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]], "category_id": 1}],
    }
    (folder / "instances.json").write_text(json.dumps(coco))
    (folder / "refs(unc).p").write_bytes(refs_pickle)
    return RefCocoSource(RefCocoSpec(root=str(root), images=str(root / "images")), size=32)


def index(source: RefCocoSource):
    shard = source.build_shard(source.split)
    return shard, [source.key(shard, source.split, i) for i in range(len(shard))]


def shared_reference_bomb(levels: int = 30, fanout: int = 4) -> bytes:
    """Level i is a list holding level i - 1 `fanout` times (BINGETs of the memo): 14 bytes a level, 4**30 =
    2**60 objects when walked as a tree, 30 levels deep. The top is [{"sentences": <level 30>}]."""
    out = bytearray(PROTO2 + b"]q\x00")  # level 0: [], memo 0
    for i in range(levels):
        out += b"]q" + bytes([i + 1]) + b"(" + (b"h" + bytes([i])) * fanout + b"e0"  # EMPTY_LIST .. APPENDS, POP
    out += b"](}" + binunicode("sentences") + b"h" + bytes([levels]) + b"se."
    return bytes(out)


# ------------------------------------------------------------------------------ the reader's limits
def test_shared_reference_bomb_is_refused_not_walked(tmp_path):
    """A ~450-byte pickle that expands to 2**60 objects: one counted skip (the old walk never returned)."""
    bomb = shared_reference_bomb()
    assert len(bomb) < 700
    shard, keys = index(write_refer(tmp_path, bomb))
    assert keys == [] and shard.skipped == {"annotation_corrupt": 1}
    with pytest.raises(pickle.UnpicklingError, match="expands to more than"):
        load_refs(tmp_path / "refcoco" / "refs(unc).p")


def test_tree_copy_stops_at_its_budget_and_depth():
    """DAGs of 2**21 and 2**201 tree nodes: the copy gives up at `budget` objects or past MAX_DEPTH levels."""
    wide: list = []
    for _ in range(20):
        wide = [wide, wide]
    with pytest.raises(pickle.UnpicklingError, match="more than 1000 objects"):
        plain_tree(wide, budget=1000)
    deep = wide
    for _ in range(180):
        deep = [deep, deep]
    with pytest.raises(pickle.UnpicklingError, match=f"nested deeper than {MAX_DEPTH}"):
        plain_tree(deep, budget=10**9)
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(pickle.UnpicklingError, match="or a cycle"):
        plain_tree(cycle, budget=10**9)
    assert plain_tree({b"a": [1, (2, b"x")]}, budget=6) == {"a": [1, (2, b"x")]}  # 6 objects: within budget


def test_shared_strings_as_python2_wrote_them_still_load(tmp_path):
    """cPickle memoizes strings: the same key object is one BINGET (2 bytes) per use. That sharing is fine."""
    body = b"](" + b"}(" + binunicode("sent") + b"q\x01" + binunicode("a") + b"u"
    body += b"}(h\x01" + binunicode("b") + b"ue"
    path = tmp_path / "refs.p"
    path.write_bytes(PROTO2 + body + b".")
    assert load_refs(path) == [{"sent": "a"}, {"sent": "b"}]


def test_deep_nesting_is_a_counted_skip(tmp_path):
    """100 000 nested lists (200 kB): the old key walk raised RecursionError, uncaught."""
    depth = 100_000
    shard, keys = index(write_refer(tmp_path, PROTO2 + b"]" * depth + b"a" * (depth - 1) + b"."))
    assert keys == [] and shard.skipped == {"annotation_corrupt": 1}
    just_deep_enough = PROTO2 + b"]" * MAX_DEPTH + b"a" * (MAX_DEPTH - 1) + b"."
    (tmp_path / "ok.p").write_bytes(just_deep_enough)
    assert isinstance(load_refs(tmp_path / "ok.p"), list)


def _no_core_dump():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_deeply_nested_tuple_as_a_dict_key_is_refused_not_a_crash(tmp_path):
    """Hashing a tuple nested 100 000 deep overflows the C stack (a segfault with the C unpickler); the
    reader refuses tuples past MAX_DEPTH as it builds them. Run in a child process, so a crash fails the test
    instead of ending the run."""
    depth = 100_000
    path = tmp_path / "refs.p"
    path.write_bytes(PROTO2 + b"}" + b")" + b"\x85" * depth + b"Ns.")  # {((((...),),),): None}
    code = (
        "import pickle, sys\n"
        "from dualrl.data.sources.refcoco import load_refs\n"
        "try:\n"
        "    load_refs(sys.argv[1])\n"
        "except pickle.UnpicklingError as err:\n"
        "    print('refused:', err)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_no_core_dump,
    )
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    assert run.stdout.startswith("refused:") and "tuples nested deeper" in run.stdout


def test_build_opcode_is_a_counted_skip(tmp_path):
    """BUILD on a dict (state {"a": None}): the C unpickler raised AttributeError, uncaught."""
    build = PROTO2 + b"](}}" + binunicode("a") + b"Nsbe."
    shard, keys = index(write_refer(tmp_path, build))
    assert keys == [] and shard.skipped == {"annotation_corrupt": 1}
    with pytest.raises(pickle.UnpicklingError, match="opcode BUILD"):
        load_refs(tmp_path / "refcoco" / "refs(unc).p")


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("truncated", PROTO2 + b"](}"),
        ("not a pickle", b"hello world\n"),
        ("set", PROTO2 + b"\x8f."),
        ("persistent id", PROTO2 + b"Pabc\n."),
        ("object", PROTO2 + b"(i__main__\nX\n."),
        ("reduce on a list", PROTO2 + b"])R."),
    ],
)
def test_any_failure_inside_is_one_counted_skip(tmp_path, name, body):
    shard, keys = index(write_refer(tmp_path, body))
    assert keys == [] and shard.skipped == {"annotation_corrupt": 1}, name


def test_memo_index_past_the_file_costs_no_memory(tmp_path):
    """LONG_BINPUT 2**24 in an 8-byte file: the C unpickler allocates a 256 MB memo table (2**31: 32 GB)."""
    path = tmp_path / "refs.p"
    path.write_bytes(PROTO2 + b"]r" + struct.pack("<I", 1 << 24) + b".")
    tracemalloc.start()
    try:
        assert load_refs(path) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


def test_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(plain_pickle, "MAX_BYTES", 100)
    shard, keys = index(write_refer(tmp_path, PROTO2 + py2([ref(0, [b"a box"] * 20)]) + b"."))
    assert keys == [] and shard.skipped == {"annotation_corrupt": 1}


# ------------------------------------------------------------------------------ Python 3 bytes, globals
def test_python3_bytes_in_protocol_2_load(tmp_path):
    """Python 3 writes bytes in protocol 2 as _codecs.encode(<str>, 'latin1'), and b"" as bytes(): every ref
    of such a file was lost to one refusal."""
    refs = [
        {"ref_id": 0, "ann_id": 1, "image_id": 1, "split": b"train", "sentences": [{"sent": b"the left box"}]},
        {"ref_id": 1, "ann_id": 1, "image_id": 1, "split": b"train", "sentences": [{"sent": b"", "raw": b"a box"}]},
    ]
    data = pickle.dumps(refs, protocol=2)
    assert b"c_codecs\nencode" in data and b"c__builtin__\nbytes" in data
    shard, keys = index(write_refer(tmp_path, data))
    assert shard.skipped == {} and [k[-2] for k in keys] == [["the left box"], ["a box"]]
    assert load_refs(tmp_path / "refcoco" / "refs(unc).p") == refs


def reduce(module: str, name: str, args: bytes) -> bytes:
    """GLOBAL module.name, MARK, args, TUPLE, REDUCE, in a list."""
    return PROTO2 + b"]c" + f"{module}\n{name}\n".encode() + b"(" + args + b"tRa."


@pytest.mark.parametrize(
    "body",
    [
        reduce("_codecs", "encode", binunicode("x") + binunicode("rot13")),  # another codec
        reduce("_codecs", "encode", binunicode("x") + binunicode("latin-1")),  # not the exact name
        reduce("_codecs", "encode", b"C\x01x" + binunicode("latin1")),  # bytes, not str
        reduce("_codecs", "encode", binunicode("x")),  # one argument
        reduce("_codecs", "encode", binunicode("x") + binunicode("latin1") + binunicode("strict")),
        reduce("__builtin__", "bytes", b"J\x00\x00\x00\x40"),  # bytes(2**30): would allocate a GB
        reduce("_codecs", "decode", binunicode("x") + binunicode("latin1")),
        reduce("builtins", "eval", binunicode("1 + 1")),
        reduce("os", "system", binunicode("true")),
    ],
)
def test_globals_other_than_the_bytes_forms_are_refused(tmp_path, body):
    path = tmp_path / "refs.p"
    path.write_bytes(body)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_refs(path)


def test_the_exact_latin1_form_is_admitted(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(reduce("_codecs", "encode", binunicode("caf\xe9") + binunicode("latin1")))
    assert load_refs(path) == [b"caf\xe9"]


# ------------------------------------------------------------------------------------------ sentences
def test_clean_text_joins_surrogate_pairs_and_refuses_lone_ones():
    assert clean_text("\ud83d\ude00 smile") == "\U0001f600 smile"  # a pair as Python 2 narrow builds had it
    assert clean_text("caf\udce9") is None  # a lone surrogate: no character, not a space
    assert clean_text(b"caf\xed\xb3\xa9") is None  # the same, as UTF-8 bytes


def test_sentences_that_are_not_text_are_counted(tmp_path, caplog):
    refs = [
        ref(0, [b"\xff\xfe not utf-8", "the good one", "caf\udce9", b""]),  # 3 dropped, the ref kept
        ref(1, [b"\xff", "caf\udce9"]),  # nothing usable: one bad_text, its sentences not counted again
        ref(2, ["fine"]),
        ref(3, [b"\xff"], split=b"val"),  # another split: not read
        [b"not a ref"],  # a list where a ref should be
    ]
    with caplog.at_level(logging.WARNING):
        shard, keys = index(write_refer(tmp_path, PROTO2 + py2(refs) + b"."))
    assert [k[-2] for k in keys] == [["the good one"], ["fine"]]
    assert shard.skipped == {"bad_sentence": 3, "bad_text": 1, "annotation_corrupt": 1}
    logged = [r.getMessage() for r in caplog.records if "(bad_sentence)" in r.getMessage()]
    assert len(logged) == 1 and "ref 0" in logged[0]  # the first is logged, the rest counted
