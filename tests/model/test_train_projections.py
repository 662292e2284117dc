"""model.train_fuse_projections: the LLM's sibling LoRA projections (query/key/value, gate/up) computed together in
the learner's updates give PEFT's loss and gradients (without dropout: the same values up to float32 rounding; with
dropout, each member keeps a mask of its own); the model's own modules are back after every update; groups that
cannot share a product are left alone; the copies follow base weights written in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dualrl.algo.rollout_data import Rollout
from dualrl.data.scenes import ShapesDataset, collate_regions
from dualrl.model.train_projections import TrainProjections, _Group
from dualrl.recipe import load_recipe
from dualrl.workers.learner import Learner
from tests.conftest import TINY, learner_step_gradients

GRAD_RTOL = 1e-4  # each gradient within this share of its largest entry (products summed in another split)


@pytest.fixture(scope="module")
def batch():
    ds = ShapesDataset("val", 4)
    return collate_regions([ds[i] for i in range(4)])


def _learner(*overrides: str, device: str = "cpu") -> Learner:
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=unused", *overrides])
    return Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, device)


def _start(batch, *overrides: str, device: str = "cpu") -> tuple[Learner, dict, Rollout]:
    """A learner whose LoRA B weights are away from their zero init (so that the A weights get gradients), its state
    before any step, and its greedy captions of the batch."""
    learner = _learner(*overrides, device=device)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    state = copy.deepcopy(learner.state_dict())
    with torch.no_grad(), learner.model.autocast():
        rollout = Rollout(learner.model.describe(batch["images"], batch["masks"], max_new_tokens=4))
    return learner, state, rollout


def _pair(batch, monkeypatch, *overrides: str, device: str = "cpu"):
    """A plain and a grouped learner from the same start, and one step of each on the batch."""
    plain, state, rollout = _start(batch, *overrides, device=device)
    fused = _learner("model.train_fuse_projections=true", *overrides, device=device)
    fused.load_state_dict(state)
    return (
        plain,
        fused,
        learner_step_gradients(plain, batch, rollout, monkeypatch),
        learner_step_gradients(fused, batch, rollout, monkeypatch),
    )


@pytest.mark.parametrize("dropout", ["0.0", "0.5"])
def test_fused_update_gives_peft_loss_and_gradients(dropout, batch, monkeypatch):
    """An sft_dual update with the grouped projections has the plain one's loss and every trainable gradient within
    float32 rounding, and the model's own projection modules are back afterwards. With dropout too: on a CPU the
    members' masks, drawn as one tensor in the members' order, are the numbers PEFT draws one layer after another
    (CUDA's generator draws other masks of the same rate)."""
    calls = []
    outputs = _Group.outputs
    monkeypatch.setattr(_Group, "outputs", lambda group, x: calls.append(x.shape) or outputs(group, x))
    _, fused, (m_plain, g_plain), (m_fused, g_fused) = _pair(
        batch, monkeypatch, f"model.trainable.lora_dropout={dropout}"
    )
    # the fused step's LLM passes went through the groups: two per layer and pass, one pass at least
    assert len(calls) >= 2 * len(fused.model.lm.layers)
    layers = fused.model.lm.layers
    assert len(fused.projections.groups) == 2 * len(layers)  # q/k/v and gate/up in every layer
    assert all(type(layer.self_attn.q_proj).__name__ == "Linear" for layer in layers)  # PEFT's, put back
    assert m_fused["train/loss"] == pytest.approx(m_plain["train/loss"], rel=1e-5)
    assert set(g_plain) == set(g_fused)
    for kind in ("q_proj.lora_A", "k_proj.lora_B", "v_proj.lora_A", "gate_proj.lora_B", "up_proj.lora_A"):
        assert any(kind in name and g_plain[name].abs().max() > 0 for name in g_plain), kind
    for name, g in g_plain.items():
        scale = g.abs().max().clamp(min=1e-3)
        assert (g_fused[name] - g).abs().max() <= GRAD_RTOL * scale, name


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path: needs CUDA")


@CUDA
def test_fused_update_on_cuda_gives_peft_gradients(batch, monkeypatch):
    """On CUDA in float32 (TF32 off), without dropout: PEFT's loss and gradients up to float32 rounding."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _, _, (m_plain, g_plain), (m_fused, g_fused) = _pair(
        batch, monkeypatch, "model.trainable.lora_dropout=0.0", device="cuda"
    )
    assert m_fused["train/loss"] == pytest.approx(m_plain["train/loss"], rel=1e-5)
    for name, g in g_plain.items():
        scale = g.abs().max().clamp(min=1e-3)
        assert (g_fused[name] - g).abs().max() <= GRAD_RTOL * scale, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_fused_update_in_bf16_is_as_close_to_float32_as_peft(device, batch, monkeypatch):
    """In bf16 the grouped products round differently from PEFT's, so the gradients are compared through a float32
    update of the same weights: each gradient's distance from it is within 1.5 times PEFT's own bf16 distance (plus
    0.5 % of its largest entry). On a CPU PEFT's bf16 gradients are up to 19 % of their largest entry from float32's
    at the tiny size, the grouped ones as far."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    reference, state, rollout = _start(batch, "model.trainable.lora_dropout=0.0", device=device)
    m_ref, g_ref = learner_step_gradients(reference, batch, rollout, monkeypatch)
    distance = {}
    for kind, extra in (("plain", ()), ("grouped", ("model.train_fuse_projections=true",))):
        learner = _learner("model.trainable.lora_dropout=0.0", "model.precision=bf16", *extra, device=device)
        learner.load_state_dict(state)
        metrics, grads = learner_step_gradients(learner, batch, rollout, monkeypatch)
        assert metrics["train/loss"] == pytest.approx(m_ref["train/loss"], rel=2e-2)
        distance[kind] = {
            n: (grads[n].float() - g).abs().max() / g.abs().max().clamp(min=1e-3) for n, g in g_ref.items()
        }
    for name in g_ref:
        assert distance["grouped"][name] <= 1.5 * distance["plain"][name] + 5e-3, name


def test_compiled_grouped_layers_give_eager_gradients(tiny_spec):
    """Under torch.compile the grouped projections are traced into each LLM layer's graph, forward and backward, with
    no graph break, and the layers' output and LoRA gradients are eager PEFT's, dropout on. The layers are compiled as
    `model.train_compile` compiles them (dynamic sizes) but with the `aot_eager` backend: the tracing is what is
    tested here, and inductor's code generation would cost half a minute on 2 cores (the learner's inductor path
    runs the grouped projections in the H200 benchmarks, `issue11.sh fused`)."""
    from torch._dynamo.utils import counters

    from dualrl.model.build import build_model
    from dualrl.model.train_compile import RECOMPILE_LIMIT

    model = build_model(tiny_spec).train()
    lm = model.lm
    params = [p for p in lm.layers.parameters() if p.requires_grad]  # LoRA
    with torch.no_grad():  # B away from its zero init, so that the A weights get gradients
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    x = torch.randn(2, 11, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def grads() -> list[torch.Tensor]:
        torch.manual_seed(5)  # dropout
        loss = lm(inputs_embeds=x, use_cache=False).last_hidden_state.square().mean()
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    eager = grads()
    breaks, frames = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    try:
        for layer in lm.layers:
            layer._compiled_call_impl = torch.compile(layer._call_impl, backend="aot_eager", dynamic=True)
        # every module's `_call_impl` shares one code object, compiled by earlier tests too: as in the learner
        # (`CompiledBlocks`), the limit on its compiled variants is raised so that these layers do compile
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), TrainProjections(lm).active():
            compiled = grads()
    finally:
        for layer in lm.layers:
            layer._compiled_call_impl = None
    assert counters["stats"]["unique_graphs"] > frames  # the layers did run compiled
    assert sum(counters["graph_break"].values()) == breaks
    assert eager[0] > 0 and any(g.abs().max() > 0 for g in eager[1:])
    for e, c in zip(eager, compiled):
        assert (c - e).abs().max() <= GRAD_RTOL * e.abs().max().clamp(min=1e-3)


def test_members_draw_their_own_dropout_masks():
    """Inside a group with dropout, members with the same A weights get different A outputs: one mask each."""
    recipe = load_recipe("recipes/sft_dual.yaml", [*TINY, "output_dir=unused", "model.trainable.lora_dropout=0.5"])
    from dualrl.model.build import build_model

    model = build_model(recipe.model).train()
    group = TrainProjections(model.lm).groups[0]
    rank = group.originals[0].r["default"]
    with torch.no_grad():
        for m in group.originals:  # the same A; B the identity on its first rows: a member's output shows its A's
            m.lora_A["default"].weight.copy_(group.originals[0].lora_A["default"].weight)
            m.lora_B["default"].weight.zero_()
            m.lora_B["default"].weight[:rank].copy_(torch.eye(rank))
    group.refresh()
    x = torch.randn(3, 5, group.bases[0].in_features)
    with torch.no_grad():
        outs = [group.part(x, k) for k in range(len(group.sizes))]
        base = torch.nn.functional.linear(x, group.weight, group.bias).split(group.sizes, dim=-1)
    deltas = [(o - b)[..., :rank] for o, b in zip(outs, base)]
    assert all(d.abs().sum() > 0 for d in deltas)
    assert not torch.allclose(deltas[0], deltas[1]) and not torch.allclose(deltas[1], deltas[2])


def test_copies_follow_base_weights_and_trainable_bases_stop_the_update():
    """A base weight written in place is copied again at the next entry; one made trainable stops it with an error
    naming the key; plain frozen linear layers group too, without adapters."""
    lm = nn.Module()
    lm.q_proj, lm.k_proj, lm.v_proj = nn.Linear(8, 6), nn.Linear(8, 2, bias=False), nn.Linear(8, 2)
    for p in lm.parameters():
        p.requires_grad_(False)
    projections = TrainProjections(lm)
    assert len(projections.groups) == 1
    x = torch.randn(4, 8)
    with projections.active():
        assert torch.allclose(lm.k_proj(x), x @ projections.groups[0].bases[1].weight.T)
    with torch.no_grad():
        projections.groups[0].originals[1].weight.mul_(2)
    with projections.active():
        got = [lm.q_proj(x), lm.k_proj(x), lm.v_proj(x)]
    want = [m(x) for m in projections.groups[0].originals]
    assert all(torch.allclose(g, w) for g, w in zip(got, want))
    assert type(lm.q_proj) is nn.Linear  # put back
    lm.v_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.train_fuse_projections"), projections.active():
        pass
    assert type(lm.q_proj) is nn.Linear


def test_groups_that_cannot_share_a_product_are_left_alone():
    """Another input size, or a trainable base (full fine-tuning), keeps the projections as they are; a model with
    nothing to group is refused, since the setting would do nothing."""
    lm = nn.Module()
    lm.q_proj, lm.k_proj, lm.v_proj = nn.Linear(8, 6), nn.Linear(4, 2), nn.Linear(8, 2)
    lm.requires_grad_(False)
    lm.mlp = nn.Module()
    lm.mlp.gate_proj, lm.mlp.up_proj = nn.Linear(8, 6), nn.Linear(8, 6)  # trainable
    with pytest.raises(ValueError, match=r"no sibling projections"):
        TrainProjections(lm)
    lm.mlp.requires_grad_(False)
    assert [names for _, names in TrainProjections(lm).places] == [("gate_proj", "up_proj")]


def test_recipe_refuses_fused_projections_with_graphs_or_sharding():
    with pytest.raises(ValueError, match="train_fuse_projections"):
        load_recipe("recipes/sft_dual.yaml", ["model.train_fuse_projections=true", "model.train_graphs=true"])
    with pytest.raises(ValueError, match="train_fuse_projections"):
        load_recipe(
            "recipes/sft_dual.yaml",
            [
                "model.train_fuse_projections=true",
                "runtime.kind=ray",
                "runtime.learners=2",
                "runtime.learner_sharding=fsdp",
            ],
        )
