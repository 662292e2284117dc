"""RefCOCO, RefCOCO+ and RefCOCOg in the `refer` layout.

    <root>/<dataset>/instances.json   COCO: images {id, file_name, height, width}, annotations {id, image_id,
                                      segmentation (polygons or RLE), area, bbox, iscrowd, category_id}
    <root>/<dataset>/refs(<by>).p     pickled list of refs {ref_id, ann_id, image_id, split, sentences:
                                      [{sent, raw, tokens, sent_id}], ...}; unc for refcoco/+, umd for refcocog
    <images>/COCO_train2014_<image_id:012>.jpg

One sample per ref (a referred object): its mask, one of its sentences as the expression (a seeded choice
per draw) and all of them as references. The pickles were written by Python 2 (or re-saved by Python 3);
they are read by `plain_pickle.load_plain`, which admits plain data only, in time and memory linear in the
file: a pickle it refuses (a class, a function, a shared-reference bomb, deep nesting) is counted as
`annotation_corrupt`. Byte strings are decoded as UTF-8; a sentence that is not text (not UTF-8, a lone
surrogate, empty) is dropped and counted as `bad_sentence`, a ref left without any as `bad_text`. The
annotation data of a split is small (50 k refs) and kept in the training process; each key carries what its
sample needs.
"""

from __future__ import annotations

import json
import pickle
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualrl.data.decode import check_mask, clean_text, coco_segmentation, read_image
from dualrl.data.sources.base import Shard, Source, skip
from dualrl.data.sources.plain_pickle import load_plain

if TYPE_CHECKING:
    from dualrl.recipe import RefCocoSpec


DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# What reading annotation fields can raise when they are of the wrong type or size (JSON and pickles hold
# anything; json.loads raises RecursionError on deep nesting).
FIELD_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError)


def load_refs(path: str | Path) -> list[dict]:
    """The refs of a `refs(<by>).p` file; `UnpicklingError` when it holds anything but a list of plain data."""
    refs = load_plain(path)
    if not isinstance(refs, list):
        raise pickle.UnpicklingError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


class RefCocoSource(Source):
    name = "refcoco"

    def __init__(self, spec: RefCocoSpec, size: int, split: str = "train", **kw):
        super().__init__(spec, size, **kw)
        self.split = spec.split if split == "train" else spec.eval_split
        root = Path(spec.root).expanduser()
        self.folder = root / spec.dataset if (root / spec.dataset).is_dir() else root
        self.refs_path = self.folder / f"refs({spec.split_by or DEFAULT_SPLIT_BY[spec.dataset]}).p"
        self.images = Path(spec.images).expanduser()
        self.cache_dir = None  # small: parsed once per run, kept in memory
        self._shard: Shard | None = None
        self._keys: list[tuple] = []

    def describe(self) -> str:
        return f"refcoco ({self.spec.dataset} {self.split}, {self.folder})"

    def shards(self) -> list[str]:
        return [self.split]

    def build_shard(self, shard: str) -> Shard:
        if self._shard is None:
            self._shard = self._parse()
        return self._shard

    def _parse(self) -> Shard:
        skipped: dict[str, int] = {}
        try:
            refs = load_refs(self.refs_path)
            coco = json.loads((self.folder / "instances.json").read_text(encoding="utf-8"))
            images = {im["id"]: im for im in coco["images"]}
            anns = {a["id"]: a for a in coco["annotations"]}
        except (OSError, pickle.UnpicklingError, *FIELD_ERRORS) as err:
            skip(skipped, "annotation_corrupt", f"{self.folder}: {err}", self.name)
            return Shard(0, skipped=skipped)
        keys = []
        for ref in refs:
            try:
                if not isinstance(ref, dict):
                    raise TypeError(f"a ref is a {type(ref).__name__}, not a dict")
                if _text(ref.get("split")) != self.split:
                    continue
                ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
                texts, dropped = _sentences(ref["sentences"])
                file_name = image.get("file_name") or f"COCO_train2014_{ref['image_id']:012d}.jpg"
                key = (
                    str(self.images / file_name),
                    int(image["height"]),
                    int(image["width"]),
                    ann["segmentation"],
                    texts,
                    int(ref["ref_id"]),
                )
            except FIELD_ERRORS as err:
                skip(skipped, "annotation_corrupt", f"ref {reprlib.repr(ref)}: {err!r}", self.name)
                continue
            if not texts:
                skip(skipped, "bad_text", f"ref {reprlib.repr(ref.get('ref_id'))}: no usable sentence", self.name)
                continue
            if dropped:
                detail = f"ref {key[-1]}: sentence {reprlib.repr(dropped[0])} is not usable text"
                skip(skipped, "bad_sentence", detail, self.name, n=len(dropped))
            keys.append(key)
        self._keys = keys
        return Shard(len(keys), skipped=skipped)

    def key(self, index: Shard, shard: str, i: int) -> tuple:
        return self._keys[i]

    def load(self, key: tuple, seed: int) -> dict[str, Any]:
        path, h, w, segmentation, texts, ref_id = key
        image = read_image(path, self.max_pixels, expect_hw=(h, w))
        mask = check_mask(coco_segmentation(segmentation, h, w, self.max_pixels), self.spec.min_area)
        expression = texts[int(np.random.default_rng(seed).integers(len(texts)))]
        return self.region(
            image, mask, index=f"{self.spec.dataset}:{ref_id}", expression=expression, references=list(texts)
        )

    def __getstate__(self) -> dict:  # workers get keys, not the parsed split
        return {**self.__dict__, "_keys": [], "_shard": None}


def _sentences(sentences: list) -> tuple[list[str], list[Any]]:
    """A ref's `sentences` -> (its distinct usable texts, the sentences dropped). A sentence is a dict whose
    `sent` (else `raw`) is the text; it is dropped when that is not usable text (`clean_text`: not UTF-8, a
    lone surrogate, empty, not a string) or when it is no dict."""
    texts, dropped = [], []
    for sentence in sentences:
        value = (sentence.get("sent") or sentence.get("raw")) if isinstance(sentence, dict) else sentence
        text = clean_text(value) if isinstance(sentence, dict) else None
        if text is None:
            dropped.append(value)
        else:
            texts.append(text)
    return list(dict.fromkeys(texts)), dropped


def _text(value: Any) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
