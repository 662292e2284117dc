"""Tokenizers: a tiny byte-level BPE built offline for the embedded default, and the special tokens.

Real models bring their own tokenizer directory; the tiny default cannot download one, so it trains a
small byte-level BPE on a fixed corpus of the words its data and prompts use. Byte-level means any text
(a user caption with unseen words included) still encodes; the corpus only decides which words are
single tokens. The corpus and trainer settings are fixed, so the vocabulary is the same on every machine.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Sa2VA's added tokens (`[SEG]`, `<p>`, `</p>`, `<vp>`, `</vp>`) plus InternVL's image tokens and the
# phi3-style chat markers the tiny template uses. Order matters: it fixes the ids of the tiny vocabulary.
CHAT_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
SA2VA_TOKENS = ("[SEG]", "<p>", "</p>", "<vp>", "</vp>")
SPECIAL_TOKENS = CHAT_TOKENS + IMAGE_TOKENS + SA2VA_TOKENS
MODEL_TOKENS = IMAGE_TOKENS + SA2VA_TOKENS

_CORPUS_WORDS = """
the a an of in at on to is it this that there are part regions region picture image marked by given
please give me short description detailed generate for segment sure it's yes no and with
small large medium big tiny red green blue yellow purple orange white black gray
circle square triangle diamond star shape object
top bottom left right center middle
""".split()

_CORPUS_SENTENCES = (
    "There are 1 part regions in the picture: region1.",
    "Please give me a short description of the region in the picture marked by region1.",
    "Please generate a detailed description for the given image region.",
    "Please segment the small blue triangle at the top left in this image.",
    "Sure, it is the large red circle in the center.",
    "What is in this image? Can you segment it?",
)


def _corpus() -> list[str]:
    words = [" ".join(_CORPUS_WORDS)] * 8
    return words + list(_CORPUS_SENTENCES) * 8 + [w.capitalize() for w in _CORPUS_WORDS]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE offline and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
    )
    return ensure_special_tokens(fast)


def ensure_special_tokens(tokenizer, tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """Add any of `tokens` the tokenizer lacks. A real checkpoint's tokenizer gets InternVL's image tokens and
    Sa2VA's only (`MODEL_TOKENS`): its chat markers are whatever that tokenizer makes of the template text,
    as in Sa2VA; adding tokens there would change how its prompts tokenize."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
