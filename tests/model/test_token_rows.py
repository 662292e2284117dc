"""The new tokens' trainable rows without a merged matrix: PEFT's values and gradients, for the embedding and the
output head, tied or not."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

from dualrl.model.build import build_model
from dualrl.model.token_rows import TokenRowsLayer
from dualrl.model.tokenizer import SA2VA_TOKENS


def _layers(model) -> list[TokenRowsLayer]:
    return [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, tiny_spec):
    spec = tiny_spec.model_copy(deep=True)
    spec.text.tie_word_embeddings = request.param
    model = build_model(spec)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained rows, unlike the base matrix's
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_every_token_layer_takes_the_fast_path(model):
    layers = _layers(model)  # the embedding's and the head's (which, tied, uses the embedding's rows)
    assert len(layers) == 2
    assert all(type(m) is TokenRowsLayer for m in layers)
    assert (layers[1].tied_adapter is layers[0]) == model.vlm.config.tie_word_embeddings


def _peft_and_ours(layer: TokenRowsLayer, x: torch.Tensor):
    """(PEFT's output, its gradients) and (ours, ours): the gradients of the input (head) and the rows."""
    results = []
    for forward in (TrainableTokensLayer.forward_adapters, TokenRowsLayer.forward_adapters):
        delta = layer.trainable_tokens_delta["default"]
        delta.grad = None
        inp = x.clone().requires_grad_(x.is_floating_point())
        out = forward(layer, inp, layer.active_adapters)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (out * weights).sum().backward()
        results.append((out.detach(), delta.grad.clone(), inp.grad))
    return results


def test_embedding_rows_match_peft(model):
    embed = model.vlm.get_input_embeddings().token_adapter
    new = model.tokenizer.convert_tokens_to_ids(list(SA2VA_TOKENS))
    ids = torch.tensor([[5, new[0], 9, new[-1], new[0]], [new[1], 3, 4, 2, 1]])
    (want, want_grad, _), (got, got_grad, _) = _peft_and_ours(embed, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad)
    assert want_grad[0].abs().sum() > 0  # the repeated token's two positions both reach its row


def test_embedding_rows_under_autocast_are_the_stored_rows(model):
    """A lookup is not autocast; neither is the product that picks the rows (bf16 would round them)."""
    embed = model.vlm.get_input_embeddings().token_adapter
    ids = torch.tensor([[5, model.seg_id, 9]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = TrainableTokensLayer.forward_adapters(embed, ids, embed.active_adapters)
        got = embed(ids)
    assert got.dtype == want.dtype == embed.base_layer.weight.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_output_head_columns_match_peft(model):
    head = model.vlm.lm_head.token_adapter
    hidden = torch.randn(3, 4, head.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    (want, want_grad, want_x), (got, got_grad, got_x) = _peft_and_ours(head, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    torch.testing.assert_close(got_x, want_x)


def test_merged_adapters_take_peft_path(model):
    embed = model.vlm.get_input_embeddings().token_adapter
    ids = torch.tensor([[1, 2, model.seg_id]])
    with torch.no_grad():
        before = embed(ids)
        embed.merge()
        try:
            assert not embed._fast(embed.active_adapters)
            torch.testing.assert_close(embed(ids), before, rtol=0, atol=0)
        finally:
            embed.unmerge()
        torch.testing.assert_close(embed(ids), before, rtol=0, atol=0)
