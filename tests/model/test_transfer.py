"""Random draws for a step: reproducible from the step's host generator, made on the device that uses them."""

from __future__ import annotations

import pytest
import torch

from dualrl.model.transfer import rand, upload


def test_host_draws_come_from_the_generator_itself():
    want = torch.rand(3, 5, generator=torch.Generator().manual_seed(7))
    got = rand((3, 5), torch.Generator().manual_seed(7), "cpu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host generator serving a GPU: needs CUDA")
def test_gpu_draws_follow_the_host_generator():
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first, again = rand((64, 4096), a, "cuda"), rand((64, 4096), b, "cuda")
    assert first.device.type == "cuda" and first.dtype == torch.float32
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # the same state, the same draws
    assert not torch.equal(rand((64, 4096), a, "cuda"), first)  # the generator moved on
    assert float(first.min()) >= 0.0 and float(first.max()) < 1.0 and abs(float(first.mean()) - 0.5) < 0.01
    assert upload(torch.ones(2), "cuda").device.type == "cuda"
