"""Tests for dualrl.algo.ema.EMA."""

from __future__ import annotations

import pytest
import torch

from dualrl.algo.ema import EMA


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[-4.0]])}


def test_one_update_matches_hand_computation() -> None:
    """ema = 0.9 * ema + 0.1 * param: w [1, 2] -> [3, 4] gives [1.2, 2.2]; b -4 -> 6 gives -2.6."""
    ema = EMA(_params(), decay=0.9)
    ema.update({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([[6.0]])})
    out = ema.tensors()
    torch.testing.assert_close(out["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))
    torch.testing.assert_close(out["b"], torch.tensor([[0.9 * -4 + 0.1 * 6]]))


def test_copy_is_float32_and_independent_of_the_params() -> None:
    """The EMA holds float32 copies: bf16 params are upcast, and later in-place param edits do not leak in."""
    params = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    ema = EMA(params, decay=0.5)
    params["w"].add_(10.0)
    assert ema.tensors()["w"].dtype == torch.float32
    assert ema.tensors()["w"].tolist() == [1.0, 2.0]
    ema.update(params)  # bf16 params upcast for the lerp
    assert ema.tensors()["w"].tolist() == [6.0, 7.0]


def test_decay_zero_copies_exactly() -> None:
    """decay = 0 makes every update an exact copy of the parameters (lerp with weight 1 is exact)."""
    ema = EMA(_params(), decay=0.0)
    new = {"w": torch.randn(2), "b": torch.randn(1, 1) * 1e6}
    ema.update(new)
    for name, value in new.items():
        assert torch.equal(ema.tensors()[name], value)


def test_params_keep_their_grads_and_values() -> None:
    """update reads trainable params under no_grad and leaves them and the autograd graph untouched."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"p": p}, decay=0.99)
    ema.update({"p": p})
    assert not ema.tensors()["p"].requires_grad
    assert p.tolist() == [1.0, 2.0] and p.grad is None


def test_decay_one_freezes_the_teacher() -> None:
    """decay = 1 keeps the starting tensors however far the parameters move."""
    params = _params()
    ema = EMA(params, decay=1.0)
    start = {n: t.clone() for n, t in ema.tensors().items()}
    for _ in range(3):
        ema.update({n: p + 5.0 for n, p in params.items()})
    assert all(torch.equal(ema.tensors()[n], start[n]) for n in start)


def test_decay_outside_unit_interval_is_rejected() -> None:
    """decay must be in [0, 1]: negative values and values over 1 raise ValueError."""
    for bad in (-0.1, 1.5, 1.0001):
        with pytest.raises(ValueError, match="decay"):
            EMA(_params(), decay=bad)


def test_state_dict_round_trip() -> None:
    """state_dict -> load_state_dict into a fresh EMA reproduces the tensors, and the copy is independent."""
    ema = EMA(_params(), decay=0.9)
    ema.update({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([[6.0]])})
    state = {k: v.clone() for k, v in ema.state_dict().items()}

    other = EMA({"w": torch.zeros(2), "b": torch.zeros(1, 1)}, decay=0.9)
    other.load_state_dict(state)
    for name in state:
        assert torch.equal(other.tensors()[name], ema.tensors()[name])
    state["w"].fill_(0.0)
    assert other.tensors()["w"].tolist() != [0.0, 0.0]


def test_name_mismatch_lists_missing_and_unexpected() -> None:
    """A state or update with different names raises KeyError listing the missing and unexpected names."""
    ema = EMA(_params(), decay=0.9)
    with pytest.raises(KeyError, match=r"missing=\['b'\], unexpected=\['c'\]"):
        ema.load_state_dict({"w": torch.zeros(2), "c": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"missing=\['w'\], unexpected=\[\]"):
        ema.update({"b": torch.zeros(1, 1)})


def test_shape_mismatch_on_load_is_an_error() -> None:
    """load_state_dict refuses a tensor of another shape, naming it, and changes nothing."""
    ema = EMA(_params(), decay=0.9)
    with pytest.raises(ValueError, match="'w'"):
        ema.load_state_dict({"w": torch.zeros(3), "b": torch.zeros(1, 1)})
    assert ema.tensors()["w"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("decay", [0.9, 0.3, 0.0])
def test_update_unless_is_update_when_good_and_moves_nothing_when_bad_even_from_nan(decay: float) -> None:
    """update_unless: a good update gives update's values to float32 rounding (decay 0 copies exactly, bf16 params
    upcast) and flags every tensor finite; a bad flag, or a parameter holding NaN, inf or values whose norm
    overflows, leaves the EMA bit for bit, and the flags name the tensors whose norm is not finite."""
    new = {"w": torch.tensor([3.0, 4.5], dtype=torch.bfloat16), "b": torch.tensor([[6.0]])}
    plain, gated = EMA(_params(), decay), EMA(_params(), decay)
    plain.update(new)
    assert gated.update_unless(new, bad=torch.tensor(False)).tolist() == [True, True]
    for name, value in plain.tensors().items():
        torch.testing.assert_close(gated.tensors()[name], value, rtol=1e-6, atol=1e-6)
        if decay == 0.0:
            assert torch.equal(gated.tensors()[name], new[name].float())
    before = {k: v.clone() for k, v in gated.tensors().items()}
    gated.update_unless({"w": torch.tensor([7.0, 8.0]), "b": torch.tensor([[1.0]])}, bad=torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in gated.tensors().items())
    for w, b, flags in (
        ([float("nan"), 1.0], [[1.0]], [False, True]),
        ([1.0, 1.0], [[float("-inf")]], [True, False]),
        ([3e19, 1.0], [[1.0]], [False, True]),  # finite, but its squares overflow
    ):
        finite = gated.update_unless({"w": torch.tensor(w), "b": torch.tensor(b)}, bad=torch.tensor(False))
        assert finite.tolist() == flags
        assert all(torch.equal(before[k], v) for k, v in gated.tensors().items())


def test_state_dict_tensors_own_their_memory() -> None:
    """The EMA's tensors are views of one buffer; its state_dict holds copies (saved and pickled on their own)."""
    ema = EMA(_params(), decay=0.5)
    state = ema.state_dict()
    assert all(t.untyped_storage().nbytes() == t.numel() * 4 for t in state.values())
    state["w"].add_(1.0)
    assert ema.tensors()["w"].tolist() == [1.0, 2.0]
