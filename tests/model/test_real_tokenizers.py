"""Checkpoint tokenizers: only InternVL's and Sa2VA's tokens are added, answers end in `model.prompts.answer_end`,
and a tokenizer that is code in its directory (InternLM2's) needs `model.trust_remote_code`."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dualrl.model.build import _hf_tokenizer, build_model
from dualrl.model.tokenizer import CHAT_TOKENS, MODEL_TOKENS

QWEN_LIKE = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _checkpoint_tokenizer(directory, tokenizer_class: str | None = None):
    """A small byte-level BPE saved as a checkpoint saves it: Qwen-style chat tokens, none of dualrl's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(QWEN_LIKE),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["please segment the red circle in this image", "sure it is the square"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    if tokenizer_class:
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config.update(
            tokenizer_class=tokenizer_class, auto_map={"AutoTokenizer": [None, f"tokenization_demo.{tokenizer_class}"]}
        )
        config_path.write_text(json.dumps(config))
        (directory / "tokenization_demo.py").write_text(
            "from transformers import PreTrainedTokenizerFast\n\n\n"
            f"class {tokenizer_class}(PreTrainedTokenizerFast):\n    pass\n"
        )
    return len(fast)


def test_only_model_tokens_are_added(tmp_path):
    n = _checkpoint_tokenizer(tmp_path)
    tok = _hf_tokenizer(tmp_path)
    vocab = tok.get_vocab()
    assert all(t in vocab for t in MODEL_TOKENS) and len(tok) == n + len(MODEL_TOKENS)
    assert not any(t in vocab for t in CHAT_TOKENS if t not in QWEN_LIKE)
    # so the phi3 markers are text here, as in Sa2VA with a Qwen tokenizer
    assert len(tok.encode("<|user|>", add_special_tokens=False)) > 1


def test_remote_code_tokenizer_needs_the_recipe_flag(tmp_path):
    _checkpoint_tokenizer(tmp_path, tokenizer_class="DemoTokenizer")
    with pytest.raises(ValueError, match=r"model\.trust_remote_code=true"):
        _hf_tokenizer(tmp_path)
    tok = _hf_tokenizer(tmp_path, trust_remote_code=True)
    assert type(tok).__name__ == "DemoTokenizer" and "[SEG]" in tok.get_vocab()


def test_one_token_answer_end_ends_answers_and_captions(tiny_spec):
    spec = tiny_spec.model_copy(deep=True)
    spec.prompts.answer_end = "</p>"  # one token: found by id
    model = build_model(spec).eval()
    end = model.tokenizer.convert_tokens_to_ids("</p>")
    assert model.eos_id == end and model.end_ids == [end]
    pieces = model.prompts.segment(torch.zeros(4, 8), "the circle")
    assert pieces[-1].text.endswith("Sure, [SEG].</p>") and pieces[-1].label
    row = torch.tensor([*model.tokenizer.encode("red circle"), end, 7, 7])
    assert model.answer_end(row) == (len(row) - 3, len(row) - 2)
    assert model.answer_end(row[:3]) == (3, 3)  # cut at max_new_tokens: no end, not finished


def test_an_answer_end_of_several_tokens_is_matched_as_text(tiny_spec):
    """Sa2VA-4B's phi3 suffix `<|end|>` is several tokens of a Qwen tokenizer; here "the end" stands in."""
    spec = tiny_spec.model_copy(deep=True)
    spec.prompts.answer_end = "the end"
    model = build_model(spec).eval()
    tok = model.tokenizer
    assert len(model.end_ids) > 1
    caption, marker, junk = tok.encode("red circle"), tok.encode(" the end"), tok.encode(" blue")
    row = torch.tensor(caption + marker + junk)
    n, stop = model.answer_end(row)
    assert (n, stop) == (len(caption), len(caption) + len(marker))
    assert tok.decode(row[:n]) == "red circle" and tok.decode(row[n:stop]) == " the end"
    assert model.answer_end(row[: len(caption) + 1]) == (len(caption) + 1,) * 2  # marker cut short
    # The stopping criterion generate() gets flags exactly the rows whose text has reached the marker.
    from dualrl.model.grounded_vlm import _EndText

    stop_at = _EndText(tok, "the end", len(model.end_ids) + 2)
    assert stop_at(row[None, :stop], None).tolist() == [True]
    assert stop_at(row[None, : stop - 1], None).tolist() == [False]
    assert stop_at(torch.tensor([caption + junk]), None).tolist() == [False]
    with pytest.raises(ValueError, match="at least 1 character"):
        spec.prompts.answer_end = ""
