"""Sa2VA's prompts as piece lists: the region prompt (mask -> caption) and the referring prompt
(text -> `[SEG]`), wrapped in the model's chat turn.

Templates come from the recipe (`model.prompts`). Markers: `<image>` becomes `<img>` + the image tokens +
`</img>`; `<region>` becomes `<vp>` + the region tokens + `</vp>`; `{question}`, `{expression}` and
`{input}` are filled in. The expression slot takes a string or an `Ids` piece, so a generated caption (or
its soft embeddings) enters the prompt token for token, never re-tokenized.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import Tensor

from dualrl.model.sequence import Feats, Ids, Piece, Text

if TYPE_CHECKING:
    from dualrl.recipe import PromptSpec


_MARKER = re.compile(r"(<image>|<region>|\{question\}|\{expression\})")


def _feats(tokens: Tensor | Feats) -> Feats:
    return tokens if isinstance(tokens, Feats) else Feats(tokens)


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same label, so text tokenizes as one string."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, Text) and out and isinstance(out[-1], Text) and out[-1].label == p.label:
            out[-1] = Text(out[-1].text + p.text, p.label)
        elif not (isinstance(p, Text) and not p.text):
            out.append(p)
    return out


class PromptBuilder:
    def __init__(self, spec: PromptSpec, eos_token: str):
        self.spec = spec
        self.eos = eos_token
        self.turn_open, sep, self.turn_close = spec.chat.partition("{input}")
        if not sep:
            raise ValueError("model.prompts.chat must contain {input}")

    def _fill(self, template: str, slots: dict[str, list[Piece]]) -> list[Piece]:
        pieces: list[Piece] = []
        for part in _MARKER.split(template):
            if part in slots:
                pieces.extend(slots[part])
            elif part:
                pieces.append(Text(part))
        return pieces

    def _turn(self, user: list[Piece], answer: list[Piece]) -> list[Piece]:
        return _merge([Text(self.turn_open), *user, Text(self.turn_close), *answer])

    @staticmethod
    def _image(image_tokens: Tensor | Feats) -> list[Piece]:
        return [Text("<img>"), _feats(image_tokens), Text("</img>")]

    def region(
        self, image_tokens: Tensor | Feats, region_tokens: Tensor | Feats, answer: str | Ids | None = None
    ) -> list[Piece]:
        """Region prompt; with `answer`, the caption follows ending in eos. A text answer and its eos are labelled
        (the LM loss learns them); token ids (`Ids`) and their eos are labelled as `answer.label` says: ids given
        as the input of a step (a teacher's caption, some tokens dropped; sampled completions) carry no target.
        `answer.stop`, when set, labels the eos alone: where a caption should end.
        Image and region tokens come as tensors [n, H] or as rows of a matrix the batch shares (`Feats` with
        `rows`)."""
        user = self._fill(
            self.spec.region,
            {
                "<image>": self._image(image_tokens),
                "<region>": [Text("<vp>"), _feats(region_tokens), Text("</vp>")],
                "{question}": [Text(self.spec.region_question)],
            },
        )
        reply: list[Piece] = []
        if isinstance(answer, str):
            reply = [Text(answer + self.eos, label=True)]
        elif isinstance(answer, Ids):
            reply = [answer, Text(self.eos, label=answer.label if answer.stop is None else answer.stop)]
        return self._turn(user, reply)

    def segment(self, image_tokens: Tensor | Feats, expression: str | Ids) -> list[Piece]:
        """Referring prompt, answered by "Sure, [SEG]." (labelled: the LM learns to emit [SEG])."""
        expr = [Text(expression)] if isinstance(expression, str) else [expression]
        user = self._fill(self.spec.segment_question, {"<image>": self._image(image_tokens), "{expression}": expr})
        return self._turn(user, [Text(self.spec.segment_answer + self.eos, label=True)])
