"""Sequence assembly: pieces of text, features and soft embeddings become one padded batch."""

from __future__ import annotations

import pytest
import torch

from dualrl.model.sequence import WIDTH_MULTIPLE, Assembler, Feats, Ids, Text
from dualrl.model.tokenizer import build_tiny_tokenizer


def _assembler():
    tok = build_tiny_tokenizer()
    embed = torch.nn.Embedding(len(tok), 4)
    return tok, embed, Assembler(tok, embed)


def test_pieces_land_in_order_with_labels_and_marks():
    """Features go in verbatim, labelled text gets its ids as labels, marks point at their positions."""
    tok, _, asm = _assembler()
    feats = torch.full((2, 4), 7.0)
    ids = torch.tensor(tok("red circle", add_special_tokens=False)["input_ids"])
    prompt = [Text("<|user|>"), Feats(feats), Ids(ids, mark="cap"), Text("<|end|>", label=True)]
    batch = asm([prompt, [Text("<|user|>")]])
    n_ids = len(ids)
    length = 1 + 2 + n_ids + 1
    width = -(-length // WIDTH_MULTIPLE) * WIDTH_MULTIPLE  # right padding rounds the width up
    assert batch.inputs_embeds.shape == (2, width, 4)
    assert torch.equal(batch.inputs_embeds[0, 1:3], feats)
    rows, cols = batch.marks["cap"]
    assert rows.tolist() == [0] * n_ids and cols.tolist() == list(range(3, 3 + n_ids))
    assert batch.labels[0, length - 1].item() == tok.convert_tokens_to_ids("<|end|>")
    assert (batch.labels[0, : length - 1] == -100).all() and (batch.labels[0, length:] == -100).all()
    assert batch.attention_mask.tolist() == [[1] * length + [0] * (width - length), [1] + [0] * (width - 1)]
    assert not batch.inputs_embeds[0, length:].any() and (batch.host_ids[0, length:] == -1).all()


def test_right_padded_widths_round_up_and_rows_keep_their_lengths():
    """Right-padded batches are as wide as their longest row rounded up to WIDTH_MULTIPLE and record each row's own
    length; left-padded ones (prompts to decode) are not rounded."""
    _tok, _, asm = _assembler()
    prompts = [[Ids(torch.arange(10, 10 + n))] for n in (3, 13, 70)]
    batch = asm(prompts)
    assert batch.lengths == (3, 13, 70)
    assert batch.inputs_embeds.shape[1] == -(-70 // WIDTH_MULTIPLE) * WIDTH_MULTIPLE > 70
    assert batch.attention_mask.sum(1).tolist() == [3, 13, 70]
    assert asm(prompts, pad_left=True).inputs_embeds.shape[1] == 70


def test_left_padding_shifts_marks():
    """With left padding, marks still point at their tokens."""
    _tok, _, asm = _assembler()
    ids = torch.tensor([10, 11])
    batch = asm([[Text("<|user|>"), Ids(ids, mark="m")], [Ids(ids, mark="m")]], pad_left=True)
    rows, cols = batch.marks["m"]
    assert batch.input_ids[rows, cols].tolist() == [10, 11, 10, 11]
    assert batch.attention_mask[1].tolist() == [0, 1, 1]


def test_soft_embeddings_replace_ids_and_carry_gradient():
    """An Ids piece with embeds uses those embeddings (not the table's), and gradients reach them."""
    _tok, _, asm = _assembler()
    soft = torch.randn(2, 4, requires_grad=True)
    batch = asm([[Text("<|user|>"), Ids(torch.tensor([10, 11]), embeds=soft)]])
    assert torch.equal(batch.inputs_embeds[0, 1:3], soft)
    batch.inputs_embeds.sum().backward()
    assert torch.equal(soft.grad, torch.ones(2, 4))


@pytest.mark.parametrize("pad_left", [False, True])
def test_shared_rows_match_copies_and_gradients(pad_left):
    """Feats with rows read a matrix the prompts share: the same embeddings and gradients as each prompt's own
    copy of those rows, with each matrix put in once (one gradient path, not one per prompt), behind other dense
    pieces (a plain feature and a second shared matrix), left-padded or not."""
    _tok, _, asm = _assembler()
    tokens = torch.randn(3, 5, 4, requires_grad=True)  # [images, tokens, H], read as 15 rows
    other = torch.randn(6, 4, requires_grad=True)  # a second shared matrix, [rows, H]
    lead = torch.randn(2, 4)  # a plain dense piece before them, in every prompt
    picks = [(range(0, 5), [1]), ([7, 9], [5, 0]), (range(10, 15), [2, 3, 4]), ([14], [])]

    def prompts(first, second):
        return [[Text("<|user|>"), Feats(lead), first(r), second(q), Text("<|end|>", label=True)] for r, q in picks]

    shared = asm(prompts(lambda r: Feats(tokens, r), lambda q: Feats(other, q)), pad_left=pad_left)
    copies = tokens.detach().clone().requires_grad_(True)
    other_copy = other.detach().clone().requires_grad_(True)
    flat = copies.flatten(0, 1)
    plain = asm(prompts(lambda r: Feats(flat[list(r)]), lambda q: Feats(other_copy[q])), pad_left=pad_left)
    assert torch.equal(shared.inputs_embeds, plain.inputs_embeds)
    assert torch.equal(shared.attention_mask, plain.attention_mask) and torch.equal(shared.labels, plain.labels)
    weights = torch.randn_like(shared.inputs_embeds)
    (shared.inputs_embeds * weights).sum().backward()
    (plain.inputs_embeds * weights).sum().backward()
    torch.testing.assert_close(tokens.grad, copies.grad)
    torch.testing.assert_close(other.grad, other_copy.grad)
    assert tokens.grad[0, 1:].abs().sum() > 0 and not tokens.grad[1, 0].any()  # row 5 is read by no prompt
    gather = shared.inputs_embeds.grad_fn  # rows picked from one source, where each shared matrix enters once
    sources = gather.next_functions[0][0].next_functions
    assert len(sources) == 1 + len(picks) + 2 + 1  # table, the plain piece of each prompt, 2 matrices, padding


def test_shared_rows_outside_their_matrix_are_an_error():
    """A row past a shared matrix would read a neighbouring piece of the source: refused."""
    _tok, _, asm = _assembler()
    tokens = torch.randn(2, 3, 4)
    with pytest.raises(IndexError, match="shared matrix of 6 rows"):
        asm([[Text("<|user|>"), Feats(tokens, [5, 6])]])
    with pytest.raises(IndexError, match="shared matrix of 6 rows"):
        asm([[Text("<|user|>"), Feats(tokens, range(-1, 2))]])


def test_ids_pieces_take_one_dimensional_ids():
    """Token ids of another shape are refused with the shape named (a [1, n] row would mis-place the piece)."""
    _, _, asm = _assembler()
    with pytest.raises(ValueError, match=r"shape \[n\], got \(1, 3\)"):
        asm([[Ids(torch.tensor([[1, 2, 3]]), label=True)]])
