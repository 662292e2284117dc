"""Small shaping rewards on the caption text alone. Both are <= 0: they take away, never add.

- `length`: 0 inside [min_words, max_words], falling linearly outside (-1 at an empty caption or at twice
  the maximum and beyond). Keeps GRPO from drifting to one-word or run-on captions.
- `repetition`: minus the share of repeated word n-grams ("the red the red circle" with n=2: 1 of 4
  bigrams repeats -> -0.25). Sampling at high temperature loves loops; this notices them. The default is
  bigrams: with single words, ordinary captions ("the circle at the top") would already pay for "the".
"""

from __future__ import annotations

from rewards.base import RewardInput


def _words(text: str) -> list[str]:
    return text.lower().split()


def length(batch: RewardInput, min_words: int = 2, max_words: int = 16) -> list[float]:
    if not 0 < min_words <= max_words:
        raise ValueError(f"length: need 0 < min_words <= max_words, got {min_words}, {max_words}")
    out = []
    for caption in batch.captions:
        n = len(_words(caption))
        if n < min_words:
            out.append(-(min_words - n) / min_words)
        elif n > max_words:
            out.append(-min(1.0, (n - max_words) / max_words))
        else:
            out.append(0.0)
    return out


def repetition(batch: RewardInput, n: int = 2) -> list[float]:
    if n < 1:
        raise ValueError(f"repetition: n must be >= 1, got {n}")
    out = []
    for caption in batch.captions:
        words = _words(caption)
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        out.append(-(1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out
