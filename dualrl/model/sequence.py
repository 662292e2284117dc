"""Assemble LLM input sequences from pieces: text, image features, region features, soft embeddings.

A prompt is a list of pieces per sample. Text is tokenized (and cached: prompt fragments repeat every step),
features and soft embeddings go in as they are, in place of InternVL's `<IMG_CONTEXT>` slots. Building the
embeddings directly, rather than writing placeholder ids and scattering, lets one image's features serve
many prompts and lets soft caption embeddings carry gradients into the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from dualrl.model.transfer import upload

# Right-padded sequences are padded to a multiple of this width. Compiled blocks (`model.train_compile`) are compiled
# for any length, but inductor assumes the alignment the first length had: a batch of a length that is not a
# multiple of 8, after one that was, compiled the 4B's decoder layers again (about 30 s on an H200).
WIDTH_MULTIPLE = 8


@dataclass
class Text:
    text: str
    label: bool = False  # LM loss on these tokens (answers); prompt tokens are -100


@dataclass
class Ids:
    ids: Tensor  # [n] token ids, e.g. a generated caption
    label: bool = False
    mark: str | None = None  # record these positions under this name
    embeds: Tensor | None = None  # optional replacement embeddings (soft tokens) for these ids
    stop: bool | None = None  # as an answer: whether the end token after it is labelled (None: as `label`)


@dataclass
class Feats:
    """Image or region features in place of `<IMG_CONTEXT>` slots: `feats` [n, H] as they are, or, with `rows`,
    those rows of a matrix that many prompts of a batch share (`feats` [M, H], or [B, T, H] read as [B*T, H]: one
    image's tokens are rows i*T to (i+1)*T, a region's the cells it covers). A shared matrix enters the
    assembled batch once and each prompt picks its rows by index: the backward pass then makes one gradient for
    it, not one full-size gradient per prompt that reads a view of it."""

    feats: Tensor
    rows: Sequence[int] | None = None  # the same tensor object for every prompt that shares it (a new view each
    # time would enter the batch once per prompt)

    def __len__(self) -> int:
        return self.feats.shape[0] if self.rows is None else len(self.rows)


Piece = Text | Ids | Feats


@dataclass
class Sequences:
    """Assembled LLM input sequences, padded (not to be confused with a data batch, the dict of regions):
    `inputs_embeds` [B, L, H], `attention_mask` [B, L], `labels` [B, L] (-100 = none),
    `input_ids` [B, L] (-1 where a piece had no ids, and for soft embeddings without labels: their ids stay on the
    device, unread), and named position marks: name -> (rows, cols). `padded_left`: padding before the tokens
    (prompts for decoding) rather than after them.
    `host_ids` and `host_labels` are the same ids and labels on the host, where positions can be looked up
    without making the host wait for the device."""

    inputs_embeds: Tensor
    attention_mask: Tensor
    labels: Tensor
    input_ids: Tensor
    host_ids: Tensor
    host_labels: Tensor
    marks: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    padded_left: bool = False
    lengths: tuple[int, ...] = ()  # each row's tokens before padding (padding past the longest: width - max(lengths))


def _shifted(rows: Sequence[int], first: int, size: int) -> Sequence[int]:
    """Rows of a shared matrix of `size` rows as rows of the gather source, where the matrix starts at `first`; a
    row outside the matrix is an error (it would read a neighbouring piece)."""
    if len(rows) and not (min(rows) >= 0 and max(rows) < size):
        raise IndexError(f"rows {min(rows)}..{max(rows)} of a shared matrix of {size} rows")
    if isinstance(rows, range):
        return range(first + rows.start, first + rows.stop, rows.step)
    return [first + r for r in rows]


def _host_ids(ids: Tensor) -> np.ndarray:
    """Token ids [n] as a host int64 array (a device tensor is read back: the host waits for it)."""
    if ids.dim() != 1:
        raise ValueError(f"an Ids piece takes token ids of shape [n], got {tuple(ids.shape)}")
    return np.asarray(ids.tolist(), dtype=np.int64)


class Assembler:
    def __init__(self, tokenizer, embed: torch.nn.Module):
        self.tokenizer = tokenizer
        self.embed = embed
        self._encode = lru_cache(maxsize=4096)(self._encode_uncached)
        self._encode_array = lru_cache(maxsize=4096)(self._encode_array_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def _encode_array_uncached(self, text: str) -> np.ndarray:
        ids = np.asarray(self._encode(text), dtype=np.int64)
        ids.flags.writeable = False  # shared by every prompt with this text
        return ids

    def __call__(self, prompts: list[list[Piece]], pad_left: bool = False) -> Sequences:
        """Pad and stack the prompts. Every output row is one row of a single source matrix (the embedded
        ids of the whole batch, then the dense pieces, then a zero row for padding), gathered with one
        index: a handful of kernels for any batch size, and one scatter-add in the backward pass."""
        text_ids: list[np.ndarray] = []  # every id that takes its embedding from the table, batch-wide
        n_text = 0
        dense: list[Tensor] = []  # features (shared matrices once each) and soft embeddings, in order
        shared: dict[int, int] = {}  # id of a shared matrix -> its first row among the dense rows
        n_dense = 0
        # per prompt: its length and its pieces as (dense?, source rows, ids or None (-1), labelled?)
        rows: list[tuple[int, list[tuple[bool, Sequence[int], np.ndarray | None, bool]]]] = []
        marks: dict[str, list[tuple[int, int, int]]] = {}
        for b, prompt in enumerate(prompts):
            spans, length = [], 0
            for piece in prompt:
                if isinstance(piece, Feats):
                    n = len(piece)
                    if piece.rows is None:
                        spans.append((True, range(n_dense, n_dense + n), None, False))
                        dense.append(piece.feats)
                        n_dense += n
                    else:
                        first = shared.get(id(piece.feats))
                        if first is None:
                            matrix = piece.feats.flatten(0, -2)
                            first = shared[id(piece.feats)] = n_dense
                            dense.append(matrix)
                            n_dense += matrix.shape[0]
                        size = piece.feats.shape[:-1].numel()
                        spans.append((True, _shifted(piece.rows, first, size), None, False))
                    length += n
                    continue
                soft = isinstance(piece, Ids) and piece.embeds is not None
                if soft and not piece.label:  # its ids are not needed here: reading them could wait for the device
                    tok, n = None, len(piece.ids)
                else:
                    tok = self._encode_array(piece.text) if isinstance(piece, Text) else _host_ids(piece.ids)
                    n = len(tok)
                if isinstance(piece, Ids) and piece.mark is not None:
                    marks.setdefault(piece.mark, []).append((b, length, n))
                if soft:
                    spans.append((True, range(n_dense, n_dense + n), tok, piece.label))
                    dense.append(piece.embeds)
                    n_dense += n
                else:
                    spans.append((False, range(n_text, n_text + n), tok, piece.label))
                    text_ids.append(tok)
                    n_text += n
                length += n
            rows.append((length, spans))

        device = next(self.embed.parameters()).device
        ids_all = np.concatenate(text_ids) if text_ids else np.zeros(0, dtype=np.int64)
        table = self.embed(upload(torch.from_numpy(ids_all[None]), device))[0]
        pad_row = n_text + n_dense
        source = torch.cat([table, *[d.to(table.dtype) for d in dense], table.new_zeros(1, table.shape[-1])])

        width = max(length for length, _ in rows)
        if not pad_left:  # free for causal attention, and compiled blocks keep one graph (see WIDTH_MULTIPLE)
            width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        # the host's part in numpy arrays, filled a piece at a time (not a token at a time: thousands a batch)
        shape = (len(rows), width)
        index = np.full(shape, pad_row, dtype=np.int64)
        all_ids, all_labels = np.full(shape, -1, dtype=np.int64), np.full(shape, -100, dtype=np.int64)
        attention = np.zeros(shape, dtype=np.int64)
        offsets = []
        for b, (length, spans) in enumerate(rows):
            start = width - length if pad_left else 0
            offsets.append(start)
            attention[b, start : start + length] = 1
            at = start
            for is_dense, src, tok, label in spans:
                n = len(src)
                shift = n_text if is_dense else 0  # dense rows come after the table's
                if isinstance(src, range):
                    index[b, at : at + n] = np.arange(src.start + shift, src.stop + shift, src.step)
                else:
                    index[b, at : at + n] = np.asarray(src, dtype=np.int64) + shift
                if tok is not None:
                    all_ids[b, at : at + n] = tok
                    if label:
                        all_labels[b, at : at + n] = tok
                at += n
        # everything known on the host goes over in one copy: gather index, attention, labels, ids, marks
        flat_marks = {
            name: (
                [b for b, _, n in spans for _ in range(n)],
                [offsets[b] + s + k for b, s, n in spans for k in range(n)],
            )
            for name, spans in marks.items()
        }
        mark_sizes = [len(r) for r, _ in flat_marks.values()]
        host = torch.from_numpy(
            np.concatenate(
                [
                    *(m.ravel() for m in (index, attention, all_labels, all_ids)),
                    np.fromiter((v for r, c in flat_marks.values() for v in (*r, *c)), dtype=np.int64),
                ]
            )
        )
        on_device = upload(host, device)
        cells = len(rows) * width
        index_d, attention_d, labels_d, ids_d = on_device[: 4 * cells].view(4, len(rows), width).unbind(0)
        mark_index, at = {}, 4 * cells
        for name, n in zip(flat_marks, mark_sizes):
            mark_index[name] = (on_device[at : at + n], on_device[at + n : at + 2 * n])
            at += 2 * n
        host_labels, host_ids = host[2 * cells : 4 * cells].view(2, len(rows), width).unbind(0)
        lengths = tuple(length for length, _ in rows)
        return Sequences(
            source[index_d], attention_d, labels_d, ids_d, host_ids, host_labels, mark_index, pad_left, lengths
        )
