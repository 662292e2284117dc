"""The CUDA IPC weight sync (`runtime.weight_sync: cuda_ipc`): the sender's buffers and handles, the receiver's
mapping kept between syncs, the refusals, which path `auto` takes for a layout; on a GPU, a real second process
reading the weights through CUDA IPC."""

from __future__ import annotations

import itertools
import multiprocessing

import pytest
import torch

from dualrl.runtime.cuda_ipc import IpcReceiver, IpcSender, SharedWeights

ray_runtime = pytest.importorskip("dualrl.runtime.ray_runtime")


class _FakeIpc:
    """Stands for CUDA IPC in one process: a handle is a number naming the shared buffer."""

    def __init__(self):
        self.buffers, self.opened, self._ids = {}, [], itertools.count()

    def share(self, buffer: torch.Tensor):
        handle = next(self._ids)
        self.buffers[handle] = buffer
        return self.rebuild, (handle,)

    def rebuild(self, handle: int) -> torch.Tensor:
        return self.buffers[handle]

    def open(self, uuid: str, rebuild, args: tuple) -> torch.Tensor:
        self.opened.append(args)
        return rebuild(*args)


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {
        "lora.b": torch.full((3, 2), scale),
        "lora.a": torch.arange(6.0).view(2, 3) * scale,
        "token_rows": torch.full((4,), scale, dtype=torch.bfloat16),
    }


def test_weights_read_through_the_shared_buffers_mapped_once():
    ipc = _FakeIpc()
    sender, receiver = IpcSender(share=ipc.share), IpcReceiver(torch.device("cpu"), open_handle=ipc.open)
    like = {k: torch.zeros_like(v) for k, v in _weights(0.0).items()}
    for scale in (1.0, 2.0, -3.0):
        shared = sender.share("ema", _weights(scale))
        assert shared.nbytes == 12 * 4 + 4 * 2
        got = receiver.receive(shared, like)
        assert got.keys() == like.keys()
        for name, value in _weights(scale).items():
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert len(ipc.buffers) == 2  # one buffer per dtype, made at the first sync and reused
    assert len(ipc.opened) == 2  # mapped once each by the worker
    sender.share("policy", _weights(5.0))
    assert len(ipc.buffers) == 4  # each kind of weights has buffers of its own


def test_a_new_layout_gets_new_buffers_and_the_worker_maps_them():
    ipc = _FakeIpc()
    sender, receiver = IpcSender(share=ipc.share), IpcReceiver(torch.device("cpu"), open_handle=ipc.open)
    small = {"w": torch.ones(3)}
    receiver.receive(sender.share("ema", small), small)
    large = {"w": torch.full((5,), 2.0)}
    got = receiver.receive(sender.share("ema", large), {"w": torch.zeros(5)})
    assert torch.equal(got["w"], large["w"])
    assert len(ipc.opened) == 2


def test_a_worker_of_another_recipe_is_refused():
    ipc = _FakeIpc()
    shared = IpcSender(share=ipc.share).share("ema", _weights(1.0))
    receiver = IpcReceiver(torch.device("cpu"), open_handle=ipc.open)
    with pytest.raises(RuntimeError, match="another recipe"):
        receiver.receive(shared, {"lora.b": torch.zeros(3, 2)})
    assert not ipc.opened


def _place(node: str, gpus: list[str]) -> dict:
    return {"node": node, "gpus": gpus, "pid": 1}


@pytest.mark.parametrize(
    ("asked", "device", "backend", "places", "path"),
    [
        ("auto", "cuda", "nccl", [_place("a", ["0"]), _place("a", ["1"])], "collective"),
        ("auto", "cuda", "gloo", [_place("a", ["0"]), _place("a", ["0"])], "cuda_ipc"),
        ("auto", "cuda", "gloo", [_place("a", ["0"]), _place("a", ["1"])], "object_store"),
        ("auto", "cuda", "gloo", [_place("a", ["0"]), _place("b", ["0"])], "object_store"),
        ("auto", "cpu", "gloo", [_place("a", []), _place("a", [])], "object_store"),
        ("object_store", "cuda", "gloo", [_place("a", ["0"]), _place("a", ["0"])], "object_store"),
        ("cuda_ipc", "cuda", "gloo", [_place("a", ["0"]), _place("a", ["0"])], "cuda_ipc"),
    ],
)
def test_the_path_auto_takes_for_a_layout(asked, device, backend, places, path):
    assert ray_runtime.weight_path(asked, device, backend, places) == path


@pytest.mark.parametrize(
    ("device", "places"),
    [("cuda", [_place("a", ["0"]), _place("a", ["1"])]), ("cpu", [_place("a", []), _place("a", [])])],
)
def test_cuda_ipc_off_one_card_is_refused(device, places):
    with pytest.raises(ValueError, match="object_store"):
        ray_runtime.weight_path("cuda_ipc", device, "gloo", places)


def _worker(inbox, outbox) -> None:
    receiver = IpcReceiver(torch.device("cuda", 0))
    like = {k: torch.zeros_like(v, device="cuda") for k, v in _weights(0.0).items()}
    while (shared := inbox.get()) is not None:
        got = receiver.receive(shared, like)
        copies = {k: v.clone() for k, v in got.items()}  # into this process's own memory, as a model's load does
        receiver.done()
        mapped = sorted(t.data_ptr() for _, t in receiver._mapped.values())  # where the buffers are mapped here
        outbox.put(({k: v.cpu() for k, v in copies.items()}, mapped))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_a_second_process_reads_the_weights_on_the_card():
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    worker = context.Process(target=_worker, args=(inbox, outbox), daemon=True)
    worker.start()
    try:
        sender, first = IpcSender(), None
        for scale in (1.0, 2.5):
            weights = {k: v.cuda() for k, v in _weights(scale).items()}
            shared = sender.share("ema", weights)
            assert isinstance(shared, SharedWeights) and shared.gpu == str(torch.cuda.get_device_properties(0).uuid)
            inbox.put(shared)
            got, mapped = outbox.get(timeout=120)
            for name, value in _weights(scale).items():
                assert torch.equal(got[name], value), name
            assert len(mapped) == 2 and mapped == (first or mapped)  # one mapping per dtype, kept from the first sync
            first = mapped
    finally:
        inbox.put(None)
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
    assert worker.exitcode == 0
