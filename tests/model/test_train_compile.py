"""model.train_compile: the learner's repeated blocks (LLM decoder layers, vision layers, SAM2's two-way blocks)
compiled by torch.compile (inductor's C++ kernels on a CPU) give eager's loss and gradients, for `pretrain` and
`sft_dual`, with LoRA dropout on and with gradient checkpointing; new sequence lengths do not compile again; and the
model decodes afterwards as it would have without it.

Compiled blocks draw dropout masks from inductor's own generator unless `fallback_random` is set: set here, so that
eager and compiled updates drop the same units and their gradients can be compared (the run itself keeps inductor's).
One eager and one compiled learner per objective share the process's compilations (the blocks' code is the same)."""

from __future__ import annotations

import pytest
import torch
import torch.fx.experimental._config
from torch._dynamo.utils import counters

from dualrl.algo.rollout_data import Rollout
from dualrl.data.scenes import ShapesDataset, collate_regions
from dualrl.model.build import build_model
from dualrl.model.train_compile import CompiledBlocks, block_stacks
from dualrl.recipe import load_recipe
from dualrl.workers.learner import Learner
from tests.conftest import TINY, learner_step_gradients

# float32 agreement of a compiled update with the eager one: each gradient within this share of its largest entry
# (fused kernels sum in another order: measured about 1e-6 on the tiny model)
GRAD_RTOL = 1e-4
# the committed tiny checkpoint (its captions are sentences, random init repeats one token), tiny run settings
SETTINGS = [o for o in TINY if not o.startswith(("model.pretrained", "model.sam.image_size"))] + ["output_dir=unused"]


@pytest.fixture(scope="module", autouse=True)
def same_dropout_masks():
    with torch._inductor.config.patch(fallback_random=True):
        yield


@pytest.fixture(scope="module")
def batches():
    ds = ShapesDataset("val", 16)
    return [collate_regions([ds[i] for i in range(start, start + 4)]) for start in (0, 4, 8)]


def _learner(algo: str, *overrides: str) -> Learner:
    recipe = load_recipe("recipes/sft_dual.yaml", [*SETTINGS, f"algo.name={algo}", *overrides])
    return Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu")


@pytest.fixture(scope="module")
def learners():
    """(eager, compiled) learners per objective and extra overrides, built on first use."""
    made: dict[tuple, tuple[Learner, Learner]] = {}

    def get(algo: str, *overrides: str) -> tuple[Learner, Learner]:
        key = (algo, *overrides)
        if key not in made:
            made[key] = (_learner(algo, *overrides), _learner(algo, "model.train_compile=true", *overrides))
        return made[key]

    return get


def _rollout(learner: Learner, batch: dict) -> Rollout | None:
    if learner.objective.rollout_weights is None:  # pretrain: supervised terms only
        return None
    with torch.no_grad():
        return Rollout(learner.model.describe(batch["images"], batch["masks"], max_new_tokens=4))


def _assert_same_update(eager: Learner, compiled: Learner, batch: dict, monkeypatch) -> None:
    compiled.load_state_dict(eager.state_dict())  # the same weights, optimizer state and step, whatever ran before
    rollout = _rollout(eager, batch)
    m_eager, g_eager = learner_step_gradients(eager, batch, rollout, monkeypatch)
    m_compiled, g_compiled = learner_step_gradients(compiled, batch, rollout, monkeypatch)
    assert m_compiled["train/loss"] == pytest.approx(m_eager["train/loss"], rel=1e-5)
    assert set(g_eager) == set(g_compiled)
    for block in ("language_model.layers.1.mlp.down_proj.lora_A", "transformer.layers.1.", "multi_modal_projector"):
        assert any(block in name for name in g_eager), block  # gradients through each compiled stack
    for name, g in g_eager.items():
        scale = g.abs().max().clamp(min=1e-3)
        assert (g_compiled[name] - g).abs().max() <= GRAD_RTOL * scale, name


def test_new_sequence_lengths_do_not_compile_again(learners, batches):
    """The layers of a stack share one compilation: the first compiled step compiles at most one graph per block kind
    and mode (vision layers without grad, LLM layers, SAM2's two blocks, which differ in a flag), not one per layer;
    later steps whose prompts have other lengths compile nothing (dynamic sizes). Runs first in this file, so that it
    sees the first compilation."""
    _, compiled = learners("pretrain")
    lengths: list[int] = []
    hook = compiled.model.lm.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        before = counters["stats"]["unique_graphs"]
        compiled.step(batches[0], None, torch.Generator().manual_seed(0))
        first = counters["stats"]["unique_graphs"] - before
        seen = len(lengths)
        for batch in batches[1:]:
            compiled.step(batch, None, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert set(lengths[seen:]) - set(lengths[:seen]), "the later batches should bring new sequence lengths"
    assert counters["stats"]["unique_graphs"] - before == first <= 4
    assert all(block._compiled_call_impl is None for block in compiled.compiled.blocks)
    with compiled.compiled.active():  # sizes equal by chance at a first call are not tied together
        assert not torch.fx.experimental._config.use_duck_shape
    assert torch.fx.experimental._config.use_duck_shape


@pytest.mark.parametrize("algo", ["pretrain", "sft_dual"])
def test_compiled_update_gives_eager_loss_and_gradients(algo, learners, batches, monkeypatch):
    """Same weights, batch and random state: the compiled blocks' update has eager's loss and every trainable
    gradient (LoRA with dropout, SAM2 decoder, projections, token rows) within float32 rounding."""
    eager, compiled = learners(algo)
    assert compiled.compiled is not None and eager.compiled is None
    assert set(compiled.compiled.stacks) == {"llm", "vision", "sam_decoder"}
    _assert_same_update(eager, compiled, batches[0], monkeypatch)


def test_compiled_update_with_gradient_checkpointing(learners, batches, monkeypatch):
    """transformers checkpoints inside the layer's forward, so the recomputation is compiled with the block: the
    gradients are still eager's."""
    eager, compiled = learners("sft_dual", "model.gradient_checkpointing=true")
    assert compiled.model.lm.layers[0].gradient_checkpointing
    _assert_same_update(eager, compiled, batches[0], monkeypatch)


def test_decoding_after_compiled_steps_is_eager_decoding(learners, batches):
    """After compiled updates the blocks run uncompiled again: the learner's greedy captions are those of a model
    never compiled holding the same weights."""
    _, compiled = learners("sft_dual")
    compiled.step(batches[1], _rollout(compiled, batches[1]), torch.Generator().manual_seed(0))
    plain = build_model(compiled.model.spec)
    plain.load_trainable(compiled.model.trainable_state())
    ours = compiled.describe(batches[2])
    with torch.no_grad():
        theirs = plain.eval().describe(batches[2]["images"], batches[2]["masks"])
    assert any(ours.texts) and ours.texts == theirs.texts
    assert [x.tolist() for x in ours.ids] == [x.tolist() for x in theirs.ids]


def test_decoder_compiled_layers_put_back_the_training_ones(learners):
    """The caption decoder's compiled layers (model.decode_compile), entered inside a compiled update, give the
    layers back their training compilation, and the update gives back what was there before it (nothing)."""
    _, compiled = learners("sft_dual")
    layers = compiled.model.lm.layers
    training = {id(layer): layer._compiled_call_impl for layer in layers}
    assert all(impl is None for impl in training.values())
    with compiled.compiled.active():
        inside = [layer._compiled_call_impl for layer in layers]
        assert all(impl is not None for impl in inside)
        with compiled.model.decoder._compiled_layers():  # no call: torch.compile compiles on first use only
            assert all(a is not b for a, b in zip(inside, (layer._compiled_call_impl for layer in layers)))
        assert [layer._compiled_call_impl for layer in layers] == inside
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_block_stacks_name_the_repeated_blocks(tiny_model):
    stacks = block_stacks(tiny_model)
    assert stacks["llm"] is tiny_model.lm.layers
    assert stacks["vision"] is tiny_model.vlm.model.vision_tower.encoder.layer
    assert stacks["sam_decoder"] is tiny_model.sam.sam_mask_decoder.transformer.layers
    with pytest.raises(ValueError, match=r"model\.train_compile"):
        block_stacks(torch.nn.Linear(2, 2))


def test_cpp_wrapper_gives_eager_gradients(tiny_model, monkeypatch):
    """model.train_compile_wrapper=cpp: inductor writes the LLM layers' forward and backward wrappers in C++ (every
    wrapper it makes is a C++ one) and the gradients are eager's. Only the LLM runs here, so only its two graphs are
    built (the two C++ builds took 46 s on 2 cores with cold caches)."""
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen

    made = []
    init = PythonWrapperCodegen.__init__

    def counted(self, *args, **kwargs):
        made.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PythonWrapperCodegen, "__init__", counted)
    lm = tiny_model.lm
    params = [p for p in lm.layers.parameters() if p.requires_grad]  # LoRA
    x = torch.randn(2, 11, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def grads() -> list[torch.Tensor]:
        loss = lm(inputs_embeds=x, use_cache=False).last_hidden_state.square().mean()
        out = torch.autograd.grad(loss, params)
        return [loss.detach(), *out]

    eager = grads()
    # inductor's caches would hand back graphs compiled by an earlier run without writing their wrappers again
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        CompiledBlocks(tiny_model, "cpp").active(),
    ):
        compiled = grads()
    assert made and set(made) == {"CppWrapperCpu"}, made
    assert len(params) > 0
    for e, c in zip(eager, compiled):
        assert (c - e).abs().max() <= GRAD_RTOL * e.abs().max().clamp(min=1e-3)
