"""Intra-op threads of the run's processes: the recipe's when it sets them, one on a GPU, torch's default on a CPU."""

from __future__ import annotations

import torch

from dualrl.runtime import intra_op_threads, set_intra_op_threads


def test_a_gpu_process_takes_one_thread_unless_the_recipe_says():
    assert intra_op_threads(None, "cuda") == 1
    assert intra_op_threads(None, "cuda:1") == 1
    assert intra_op_threads(6, "cuda") == 6
    assert intra_op_threads(None, "cpu") is None  # torch's default stays
    assert intra_op_threads(3, "cpu") == 3


def test_set_leaves_torchs_default_alone_on_a_cpu():
    before = torch.get_num_threads()
    try:
        set_intra_op_threads(None, "cpu")
        assert torch.get_num_threads() == before
        set_intra_op_threads(None, "cuda")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
