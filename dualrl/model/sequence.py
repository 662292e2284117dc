"""Assemble LLM input sequences from pieces: text, image features, region features, soft embeddings.

A prompt is a list of pieces per sample. Text is tokenized (and cached: prompt fragments repeat every step),
features and soft embeddings go in as they are, in place of InternVL's `<IMG_CONTEXT>` slots. Building the
embeddings directly, rather than writing placeholder ids and scattering, lets one image's features serve
many prompts and lets soft caption embeddings carry gradients into the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor


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


@dataclass
class Feats:
    feats: Tensor  # [n, H] image or region features


Piece = Text | Ids | Feats


@dataclass
class Batch:
    """A padded batch: `inputs_embeds` [B, L, H], `attention_mask` [B, L], `labels` [B, L] (-100 = none),
    `input_ids` [B, L] (-1 where a piece had no ids), and named position marks: name -> (rows, cols)."""

    inputs_embeds: Tensor
    attention_mask: Tensor
    labels: Tensor
    input_ids: Tensor
    marks: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


class Assembler:
    def __init__(self, tokenizer, embed: torch.nn.Module):
        self.tokenizer = tokenizer
        self.embed = embed
        self._encode = lru_cache(maxsize=4096)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def __call__(self, prompts: list[list[Piece]], pad_left: bool = False) -> Batch:
        device = self.embed.weight.device if hasattr(self.embed, "weight") else None
        # Tokenize all text pieces, embed all ids of the batch in one call.
        id_chunks: list[Tensor] = []
        for prompt in prompts:
            for piece in prompt:
                if isinstance(piece, Text):
                    id_chunks.append(torch.tensor(self.encode(piece.text), dtype=torch.long))
                elif isinstance(piece, Ids) and piece.embeds is None:
                    id_chunks.append(piece.ids.detach().long().cpu())
        flat = torch.cat(id_chunks) if id_chunks else torch.zeros(0, dtype=torch.long)
        if device is None:
            device = next(self.embed.parameters()).device
        flat_embeds = self.embed(flat.to(device).unsqueeze(0))[0]
        chunks = iter(torch.split(flat_embeds, [len(c) for c in id_chunks]))

        rows_embeds, rows_ids, rows_labels = [], [], []
        marks: dict[str, list[tuple[int, int, int]]] = {}
        for b, prompt in enumerate(prompts):
            embeds, ids, labels, cursor = [], [], [], 0
            for piece in prompt:
                if isinstance(piece, Feats):
                    n = piece.feats.shape[0]
                    embeds.append(piece.feats)
                    ids.append(torch.full((n,), -1, dtype=torch.long))
                    labels.append(torch.full((n,), -100, dtype=torch.long))
                else:
                    if isinstance(piece, Text):
                        tok = torch.tensor(self.encode(piece.text), dtype=torch.long)
                        embeds.append(next(chunks))
                    else:
                        tok = piece.ids.detach().long().cpu()
                        embeds.append(piece.embeds if piece.embeds is not None else next(chunks))
                        if piece.mark is not None:
                            marks.setdefault(piece.mark, []).append((b, cursor, len(tok)))
                    n = len(tok)
                    ids.append(tok)
                    labels.append(tok.clone() if piece.label else torch.full((n,), -100, dtype=torch.long))
                cursor += n
            rows_embeds.append(torch.cat(embeds).to(flat_embeds.dtype))
            rows_ids.append(torch.cat(ids))
            rows_labels.append(torch.cat(labels))

        width = max(r.shape[0] for r in rows_ids)
        hidden = rows_embeds[0].shape[-1]
        bsz = len(prompts)
        out_embeds = flat_embeds.new_zeros(bsz, width, hidden)
        out_ids = torch.full((bsz, width), -1, dtype=torch.long)
        out_labels = torch.full((bsz, width), -100, dtype=torch.long)
        attn = torch.zeros(bsz, width, dtype=torch.long)
        offsets = []
        for b in range(bsz):
            n = rows_ids[b].shape[0]
            start = width - n if pad_left else 0
            offsets.append(start)
            out_embeds[b, start:start + n] = rows_embeds[b]
            out_ids[b, start:start + n] = rows_ids[b]
            out_labels[b, start:start + n] = rows_labels[b]
            attn[b, start:start + n] = 1
        mark_index = {}
        for name, spans in marks.items():
            r = torch.cat([torch.full((n,), b, dtype=torch.long) for b, _, n in spans])
            c = torch.cat([torch.arange(offsets[b] + s, offsets[b] + s + n) for b, s, n in spans])
            mark_index[name] = (r.to(device), c.to(device))
        return Batch(out_embeds, attn.to(device), out_labels.to(device), out_ids.to(device), mark_index)
