"""A pickle reader for annotation files that admits plain data only, in time and memory linear in the file.

RefCOCO's `refs(<by>).p` files are pickles written by Python 2 (or re-saved by Python 3). A pickle is a
program: the standard unpickler will call any function the file names, and even without one it can be
made to hang or crash. This reader closes each way:

- **No code.** Globals are refused, except the two that Python 3 writes for `bytes` in protocols 0-2:
  `_codecs.encode(<str>, 'latin1')` (nothing else: another codec, another argument type or count is
  refused) and `__builtin__.bytes()` with no argument (b""). Opcodes that build objects (BUILD, INST, OBJ,
  NEWOBJ, NEWOBJ_EX), persistent ids, the extension registry, sets and out-of-band buffers are refused.
- **Linear work.** It runs on Python's pure-Python unpickler, whose memo is a dict: a memo index far past
  the file (`LONG_BINPUT 2**31`) costs one entry, not the C unpickler's table of that many slots.
- **A tree, bounded.** Shared references make a 600-byte pickle expand into 2**100 objects when walked
  as a tree. The result is copied into a plain tree (dict keys that are byte strings become text) while
  counting objects: every object of a pickle costs at least one byte, so a tree with more objects than
  the file has bytes can only come from shared references, and the file is refused. The copy also
  refuses nesting deeper than `MAX_DEPTH` (a cycle is infinitely deep), and tuples are checked for depth
  as they are built, because hashing a deeply nested tuple (a dict key) overflows the C stack.
- **One error type.** Whatever goes wrong inside becomes `pickle.UnpicklingError`, so the caller counts
  the file as corrupt instead of crashing on an `AttributeError` or a `RecursionError`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

MAX_BYTES = 256 << 20  # the refer pickles are ~35 MB; a pure-Python object costs ~60 bytes per pickle byte
MAX_DEPTH = 32  # refs nest 5 deep (list > ref > sentences > sentence > tokens)


def _latin1_bytes(*args: Any) -> bytes:
    """`_codecs.encode` as Python 3 uses it for `bytes` in protocol 2: encode(<str>, 'latin1'), only."""
    if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str or args[1] != "latin1":
        raise pickle.UnpicklingError("refused: _codecs.encode is admitted only as encode(<str>, 'latin1')")
    return args[0].encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`__builtin__.bytes` as Python 3 uses it for b"" in protocol 2: called with no argument, only."""
    if args:
        raise pickle.UnpicklingError("refused: bytes(...) is admitted only without arguments (b'')")
    return b""


GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
REFUSED = frozenset(
    "BUILD INST OBJ NEWOBJ NEWOBJ_EX PERSID BINPERSID EXT1 EXT2 EXT4 EMPTY_SET ADDITEMS FROZENSET "
    "BYTEARRAY8 NEXT_BUFFER READONLY_BUFFER".split()
)
TUPLES = frozenset("EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3".split())


_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


class _Dispatch(dict):
    """The opcode table: a refused or unknown opcode is an `UnpicklingError` naming it."""

    def __missing__(self, code: int):
        name = _NAMES.get(code, hex(code))
        raise pickle.UnpicklingError(f"refused: opcode {name} is not allowed in annotation files")


def _checked_tuple(load):
    """Wrap a tuple-building opcode: the new tuple's nesting depth is recorded, and refused past MAX_DEPTH."""

    def run(self: PlainUnpickler) -> None:
        load(self)
        made = self.stack[-1]
        inner = [self.tuple_depth.get(id(x), (0,))[0] for x in made if type(x) is tuple]
        depth = 1 + max(inner, default=0)
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"tuples nested deeper than {MAX_DEPTH} levels")
        self.tuple_depth[id(made)] = (depth, made)  # the tuple is kept alive, so its id stays its own

    return run


class PlainUnpickler(pickle._Unpickler):
    """Admits dicts, lists, tuples, strings, bytes, numbers, booleans and None (see the module docstring)."""

    dispatch = _Dispatch(
        {
            code: _checked_tuple(load) if _NAMES.get(code) in TUPLES else load
            for code, load in pickle._Unpickler.dispatch.items()
            if _NAMES.get(code) not in REFUSED
        }
    )

    def __init__(self, file: io.BytesIO):
        super().__init__(file, encoding="bytes")  # Python 2 `str` stays bytes; its `unicode` becomes str
        self.tuple_depth: dict[int, tuple[int, tuple]] = {}

    def find_class(self, module: str, name: str) -> Any:
        admitted = GLOBALS.get((module, name))
        if admitted is None:
            raise pickle.UnpicklingError(
                f"refused: the pickle names {module}.{name}; only plain containers are allowed in annotation files"
            )
        return admitted


def plain_tree(obj: Any, budget: int) -> Any:
    """`obj` copied as a tree of at most `budget` objects and `MAX_DEPTH` levels, byte-string dict keys
    decoded as UTF-8; `UnpicklingError` past either limit, after at most `budget + 1` visits."""
    left = budget

    def copy(value: Any, depth: int) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise pickle.UnpicklingError(
                f"the pickle expands to more than {budget} objects, more than its {budget} bytes can hold: "
                "shared references repeated into a tree"
            )
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"containers nested deeper than {MAX_DEPTH} levels (or a cycle)")
        kind = type(value)
        if kind is dict:
            return {_text_key(k): copy(v, depth + 1) for k, v in value.items()}
        if kind is list:
            return [copy(v, depth + 1) for v in value]
        if kind is tuple:
            return tuple(copy(v, depth + 1) for v in value)
        return value

    return copy(obj, 0)


def _text_key(key: Any) -> Any:
    """Python 2 `str` keys arrive as bytes: make them text so `ref["sentences"]` works either way."""
    return key.decode("utf-8", "replace") if type(key) is bytes else key


def load_plain(path: str | Path, max_bytes: int | None = None) -> Any:
    """The plain data in a pickle file; `UnpicklingError` for anything else, whatever the cause inside."""
    path = Path(path)
    limit = MAX_BYTES if max_bytes is None else max_bytes
    size = path.stat().st_size
    if size > limit:
        raise pickle.UnpicklingError(f"{path} is {size} bytes, over the {limit}-byte limit for annotation pickles")
    data = path.read_bytes()
    try:
        return plain_tree(PlainUnpickler(io.BytesIO(data)).load(), budget=len(data))
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # EOFError, AttributeError, RecursionError, MemoryError, ...: a corrupt file
        raise pickle.UnpicklingError(f"{type(err).__name__}: {str(err)[:200]}") from err
