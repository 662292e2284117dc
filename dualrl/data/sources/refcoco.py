"""RefCOCO, RefCOCO+ and RefCOCOg in the `refer` layout.

    <root>/<dataset>/instances.json   COCO: images {id, file_name, height, width}, annotations {id, image_id,
                                      segmentation (polygons or RLE), area, bbox, iscrowd, category_id}
    <root>/<dataset>/refs(<by>).p     pickled list of refs {ref_id, ann_id, image_id, split, sentences:
                                      [{sent, raw, tokens, sent_id}], ...}; unc for refcoco/+, umd for refcocog
    <images>/COCO_train2014_<image_id:012>.jpg

One sample per ref (a referred object): its mask, one of its sentences as the expression (a seeded choice
per draw) and all of them as references. The pickles were written by Python 2; they are read by an
unpickler that admits plain containers only (no class, no function: a pickle that names any is refused), with
byte strings decoded as UTF-8 and sentences that are not UTF-8, or empty, dropped. The annotation data of a
split is small (50 k refs) and kept in the training process; each key carries what its sample needs.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualrl.data.decode import check_mask, clean_text, coco_segmentation, read_image
from dualrl.data.sources.base import Shard, Source, skip

if TYPE_CHECKING:
    from dualrl.recipe import RefCocoSpec


DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


class PlainUnpickler(pickle.Unpickler):
    """Admits dicts, lists, tuples, strings, bytes, numbers, booleans and None; refuses every global."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refused: the pickle names {module}.{name}; only plain containers are allowed in annotation files"
        )


def _plain_keys(obj: Any) -> Any:
    """Python 2 str keys arrive as bytes: make them text so `ref["sentences"]` works either way."""
    if isinstance(obj, dict):
        return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): _plain_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_keys(v) for v in obj]
    return obj


def load_refs(path: str | Path) -> list[dict]:
    data = Path(path).read_bytes()
    refs = PlainUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(refs, list):
        raise pickle.UnpicklingError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return _plain_keys(refs)


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
        except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as err:
            skip(skipped, "annotation_corrupt", f"{self.folder}: {err}", self.name)
            return Shard(0, skipped=skipped)
        keys = []
        for ref in refs:
            try:
                if not isinstance(ref, dict) or _text(ref.get("split")) != self.split:
                    continue
                ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
                sentences = [s.get("sent") or s.get("raw") for s in ref["sentences"] if isinstance(s, dict)]
                texts = list(dict.fromkeys(t for t in map(clean_text, sentences) if t))
                file_name = image.get("file_name") or f"COCO_train2014_{ref['image_id']:012d}.jpg"
                key = (
                    str(self.images / file_name),
                    int(image["height"]),
                    int(image["width"]),
                    ann["segmentation"],
                    texts,
                    int(ref["ref_id"]),
                )
            except (KeyError, TypeError, ValueError) as err:
                skip(skipped, "annotation_corrupt", f"ref {str(ref)[:80]}: {err!r}", self.name)
                continue
            if not texts:
                skip(skipped, "bad_text", f"ref {ref.get('ref_id')}: no usable sentence", self.name)
                continue
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


def _text(value: Any) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
