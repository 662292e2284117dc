"""`Shards.whole` under FSDP2 on 2 CPU ranks (gloo): the whole tensors equal each DTensor's own `full_tensor()`, for
parameters, plain local shards, uneven and empty shards and the optimizer's states, in one all-gather per dtype, or
one gather to rank 0 alone."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = nn.Linear(3, 5)  # 5 rows over 2 ranks: 3 and 2; the bias too
        self.one = nn.Parameter(torch.randn(1, 4))  # 1 row: the second rank holds none
        self.cube = nn.Parameter(torch.randn(3, 2, 2))
        self.wide = nn.Module()  # a second dtype (sharded as its own group, as FSDP2 wants): a second gather
        self.wide.weight = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(2, 2), requires_grad=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(body, init: bool, rank: int, port: int, failures) -> None:
    """One spawned rank: joins the gloo group (unless `body` does: `init`), runs `body(rank, port)`, and reports a
    failure to the parent (an assertion in a child would only end that child)."""
    if init:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        body(rank, port)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    except BaseException as err:
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        code = 1
    else:
        code = 0
    if dist.is_initialized():
        dist.destroy_process_group()
    failures.close()
    failures.join_thread()  # the message is out before the process ends
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an active exception");
    # the test has its answer by now, so the rank ends here
    os._exit(code)


def _whole_rank(rank: int, port: int) -> None:
    """`Shards.whole` and `whole_optimizer` against each DTensor's `full_tensor()`, and the collectives they make."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualrl.workers.sharding import Shards

    torch.manual_seed(0)  # the same whole weights on both ranks
    mesh = init_device_mesh("cpu", (WORLD,))
    net = _Net()
    fully_shard(net.wide, mesh=mesh)
    fully_shard(net, mesh=mesh)
    shards = Shards(net)
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    expected = {n: p.full_tensor() for n, p in params.items()}
    locals_ = shards.local(params)

    calls = []
    real, real_gather = dist.all_gather, dist.gather
    dist.all_gather = lambda *a, **k: calls.append("all_gather") or real(*a, **k)
    dist.gather = lambda *a, **k: calls.append("gather") or real_gather(*a, **k)
    try:
        got_dtensors = shards.whole(params)
        gathers = list(calls)
        got_locals = shards.whole(locals_)
        calls.clear()
        first = shards.whole(locals_, first_only=True)
        to_first = list(calls)
        opt = torch.optim.AdamW(list(net.parameters()), lr=0.1)
        for p in params.values():
            p.grad = p.detach() * 0.5  # sharded like its parameter, as FSDP2's gradients are
        opt.step()
        state = shards.whole_optimizer(opt.state_dict())
    finally:
        dist.all_gather, dist.gather = real, real_gather
    order = list(net.parameters())
    for name in expected:
        assert torch.equal(got_dtensors[name], expected[name]), name
        assert torch.equal(got_locals[name], expected[name]), name
        assert not isinstance(got_dtensors[name], type(params[name])), name
    assert list(got_dtensors) == list(params)
    assert gathers == ["all_gather"] * 2, f"{gathers} for 2 dtypes"
    assert to_first == ["gather"] * 2, f"{to_first} for 2 dtypes, to rank 0 alone"
    if rank == 0:
        assert list(first) == list(params) and all(torch.equal(first[n], expected[n]) for n in expected)
    else:
        assert first == {}, "only rank 0 gets the whole tensors"
    first_state = shards.whole_optimizer(opt.state_dict(), first_only=True)
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            want = v.full_tensor() if hasattr(v, "full_tensor") else v
            assert torch.equal(state["state"][i][k], want), (i, k)
            if rank == 0:
                assert torch.equal(first_state["state"][i][k], want), (i, k)
    assert len(state["state"]) == sum(p.requires_grad for p in order)


def _reference_rank(rank: int, port: int) -> None:
    """A frozen tiny model sharded by `sharded_call`: each rank holds part of each block, and the call gives the
    log-probs the whole model gives."""
    from torch.distributed.tensor import DTensor

    from dualrl.algo.grpo_objective import completion_logprobs
    from dualrl.data.scenes import ShapesDataset, collate_regions
    from dualrl.model.build import build_model
    from dualrl.recipe import load_recipe
    from dualrl.workers.sharding import sharded_call
    from tests.conftest import TINY

    torch.manual_seed(0)  # the same whole weights on both ranks
    reference = build_model(load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=unused"]).model).eval()
    reference.requires_grad_(False)
    ds = ShapesDataset("val", 8)
    batch = collate_regions([ds[i] for i in range(2)])
    completions = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    with torch.no_grad():
        feats = reference.encode_images(batch["images"])
        args = (feats, batch["masks"], torch.arange(2), completions, 1.0)
        whole, mask, _ = completion_logprobs(reference, *args)
        layer = reference.lm.layers[0].self_attn.q_proj.base_layer.weight
        rows = layer.shape[0]
        call = sharded_call(reference, torch.device("cpu"))
        layer = reference.lm.layers[0].self_attn.q_proj.base_layer.weight
        assert isinstance(layer, DTensor) and layer.to_local().shape[0] == rows // WORLD
        for _ in range(2):  # the shards are freed after a call and gathered again by the next
            got, got_mask, _ = call(completion_logprobs, *args)
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
            assert torch.equal(got_mask, mask)
            assert isinstance(reference.lm.layers[0].self_attn.q_proj.base_layer.weight, DTensor)


def _grpo_rank(rank: int, port: int) -> None:
    """Two GRPO learners with a KL term, sharded (fsdp): the reference is sharded too, and an update runs with a KL
    of 0 at the start (the reference is the starting policy)."""
    from torch.distributed.tensor import DTensor

    from dualrl.algo.rollout_data import Rollout
    from dualrl.data.scenes import ShapesDataset, collate_regions
    from dualrl.recipe import load_recipe
    from dualrl.workers.learner import Learner
    from tests.conftest import TINY

    overrides = [*TINY, "output_dir=unused", "algo.name=grpo", "algo.grpo.num_generations=2"]
    overrides += ["algo.grpo.beta=0.04", "model.trainable.lora_dropout=0.0"]
    recipe = load_recipe("recipes/sft_dual.yaml", overrides)
    torch.manual_seed(0)
    learner = Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu")
    ds = ShapesDataset("val", 8)
    batch = collate_regions([ds[i] for i in range(4)])
    with torch.no_grad():
        captions = learner.model.eval().describe(
            batch["images"], batch["masks"], sample=True, group_size=2, max_new_tokens=4
        )
    rollout = Rollout(captions, 2, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.3, 0.8, 0.0]))
    learner.join_group(f"127.0.0.1:{port}", rank, WORLD, "gloo", 60.0, how="fsdp")
    reference = learner.objective.reference
    assert isinstance(reference.lm.layers[0].self_attn.q_proj.base_layer.weight, DTensor)
    metrics = learner.step(batch, rollout, torch.Generator().manual_seed(0))
    assert abs(metrics["grpo/kl"]) < 1e-6 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def _spawn(body, init: bool = True) -> None:
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run_rank, args=(body, init, r, port, failures)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    stuck = [p for p in procs if p.is_alive()]
    for p in stuck:
        p.kill()
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, errors
    assert not stuck, "a rank did not finish within 120 s"
    assert [p.exitcode for p in procs] == [0] * WORLD


def test_whole_gathers_every_shard_in_one_all_gather_per_dtype():
    _spawn(_whole_rank)


def test_a_sharded_reference_gives_the_whole_models_logprobs():
    _spawn(_reference_rank)


def test_a_sharded_grpo_learner_shards_its_reference_and_updates():
    _spawn(_grpo_rank, init=False)  # the learner joins the group itself
