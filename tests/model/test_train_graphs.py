"""model.train_graphs: the encoders and SAM2's decoding captured as CUDA graphs in the learner's update.

On a CPU: the graphs' bodies compute what the plain code computes, from the parameters they should own; one capture
per input signature, eager past `max_graphs`; the recipe refuses the settings it cannot serve. On CUDA (the GPU
machine runs this file): a `pretrain` update with the graphs gives the eager update's loss and gradients, captures
each part once, and a second update captures nothing more."""

from __future__ import annotations

import pytest
import torch

from dualrl.data.scenes import ShapesDataset, collate_regions
from dualrl.model import sam as samlib
from dualrl.model.build import build_model
from dualrl.model.train_graphs import TrainGraphs, _Decoder, _Encoders, _Language
from dualrl.recipe import load_recipe
from dualrl.train import step_generator
from dualrl.workers.learner import Learner
from tests.conftest import TINY

# every part trainable (as pretraining has it), no dropout: the two updates must see the same numbers
PRETRAIN = [
    *TINY,
    "output_dir=unused",
    "algo.name=pretrain",
    "model.trainable.vision=true",
    "model.trainable.sam_encoder=true",
    "model.trainable.lora_dropout=0.0",
    "algo.pretrain.point_weight=1.0",
]


@pytest.fixture(scope="module")
def batch():
    ds = ShapesDataset("val", 8)
    return collate_regions([ds[i] for i in range(4)])


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_graph_bodies_compute_the_plain_parts(tiny_spec, batch):
    model = build_model(tiny_spec).train()
    images = batch["images"]
    vision, sam = model.encode_pixels(images)
    out = _Encoders(model)(images)
    assert torch.equal(out[0], vision) and torch.equal(out[1], sam.image_embed)
    assert all(torch.equal(a, b) for a, b in zip(out[2:], sam.high_res)) and len(out) == 4
    assert not model.sam.use_high_res_features_in_sam and not any(h.requires_grad for h in out[2:])
    encoders = _ids(model.vlm.model.vision_tower.parameters()) | _ids(model.sam.image_encoder.parameters())
    assert _ids(_Encoders(model).parameters()) == encoders  # the LLM's weights stay out of the graph

    query = torch.randn(4, 256)
    clicks = samlib.click_inside(batch["masks"], model.spec.sam.image_size, torch.Generator().manual_seed(0))
    for q, points in ((query, None), (None, clicks), (query, clicks)):
        body = _Decoder(model.sam, model.spec.multimask, q is not None, points is not None)
        args = (sam.image_embed, *sam.high_res, *(() if q is None else (q,)), *(points or ()))
        got = body(*args)
        want = samlib.decode(model.sam, sam, q, model.spec.multimask, points=points)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert got[0].requires_grad and not got[1].requires_grad  # the IoU head gets no zero gradients from a graph
    owned = _ids(_Decoder(model.sam, False, True, False).parameters())
    assert not owned & encoders and id(model.sam.no_mem_embed) in owned
    assert _ids(model.sam.sam_mask_decoder.parameters()) <= owned


def _no_capture(monkeypatch) -> None:
    """Graphs stand-in on a CPU: a capture counts and hands the part's module back, which then runs eagerly."""

    def capture(self, module, args):
        self.captures += 1
        return module

    monkeypatch.setattr(TrainGraphs, "_capture", capture)


def test_the_language_body_computes_the_llms_hidden_states(tiny_spec, batch, monkeypatch):
    model = build_model(tiny_spec).train()
    feats = model.encode_images(batch["images"])
    seq = model.assemble(model.segment_prompts(model.project(feats), torch.arange(4), list(batch["expression"])))
    types = model.lm.config.layer_types
    want = model.lm_hidden(seq)
    assert torch.equal(_Language(model.lm, list(dict.fromkeys(types)))(seq.inputs_embeds), want)
    _no_capture(monkeypatch)
    graphs = TrainGraphs(model)
    assert torch.equal(graphs.language(seq.inputs_embeds, dict.fromkeys(types)), want)  # through the graphs' call
    mask = (
        seq.attention_mask[:, None, None, :].bool() & torch.ones(1, 1, *seq.attention_mask.shape[1:] * 2).tril().bool()
    )
    assert graphs.language(seq.inputs_embeds, mask).shape == want.shape and graphs.captures == 2
    assert _ids(_Language(model.lm, None).parameters()) == _ids(model.lm.parameters())


def test_one_capture_per_signature_then_eager(tiny_spec, batch, monkeypatch):
    """Same shapes replay the captured part; new shapes capture again, up to max_graphs; past that, eager."""
    model = build_model(tiny_spec).train()
    graphs = TrainGraphs(model, max_graphs=2)
    _no_capture(monkeypatch)
    _, sam = model.encode_pixels(batch["images"])
    query = torch.randn(4, 256)
    plain = samlib.decode(model.sam, sam, query, model.spec.multimask)
    for _update in range(2):
        with graphs.active():  # an update: the n-th call of a signature replays its n-th graph
            assert model.train_graphs is graphs
            for _ in range(2):  # a second call in one update gets a graph of its own
                assert torch.equal(graphs.decode(sam, query, None)[0], plain[0])
        assert (graphs.captures, graphs.eager_calls) == (2, 0)
    with graphs.active():
        graphs.decode(sam.select(torch.tensor([0, 1])), query[:2], None)  # two regions: a new signature, past max
    assert model.train_graphs is None
    assert (graphs.captures, graphs.eager_calls, len(graphs.graphs)) == (2, 1, 2)


def test_the_recipe_refuses_what_the_graphs_cannot_serve():
    with pytest.raises(ValueError, match=r"train_graphs with model\.train_compile"):
        load_recipe("recipes/sft_dual.yaml", [*PRETRAIN, "model.train_graphs=true", "model.train_compile=true"])
    with pytest.raises(ValueError, match=r"train_graphs with model\.gradient_checkpointing"):
        load_recipe(
            "recipes/sft_dual.yaml", [*PRETRAIN, "model.train_graphs=true", "model.gradient_checkpointing=true"]
        )
    with pytest.raises(ValueError, match=r"learners=2 with model\.train_graphs"):
        load_recipe(
            "recipes/sft_dual.yaml", [*PRETRAIN, "model.train_graphs=true", "runtime.kind=ray", "runtime.learners=2"]
        )
    recipe = load_recipe("recipes/sft_dual.yaml", [*PRETRAIN, "model.train_graphs=true"])
    assert Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu").graphs is None  # CPUs: plain code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: needs CUDA")
def test_a_graphed_update_gives_the_eager_gradients(batch, monkeypatch):
    def learner(*overrides: str) -> Learner:
        recipe = load_recipe("recipes/sft_dual.yaml", [*PRETRAIN, *overrides])
        torch.manual_seed(0)
        return Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cuda")

    eager, graphed = learner(), learner("model.train_graphs=true")
    graphed.model.load_state_dict(eager.model.state_dict())
    grads: dict[str, dict[str, torch.Tensor]] = {}

    def capture(name: str, one: Learner):
        step = one.optimizer.step

        def record():
            grads[name] = {n: p.grad.clone() for n, p in one.model.named_parameters() if p.grad is not None}
            step()

        monkeypatch.setattr(one.optimizer, "step", record)

    for k in (1, 2):
        figures = {}
        for name, one in (("eager", eager), ("graphed", graphed)):
            capture(name, one)
            figures[name] = one.step(batch, None, step_generator(0, k))
        assert figures["graphed"]["train/loss"] == pytest.approx(figures["eager"]["train/loss"], rel=1e-4)
        assert grads["graphed"].keys() == grads["eager"].keys()
        largest = max(g.abs().max() for g in grads["eager"].values())
        for n, g in grads["eager"].items():  # within 1e-3 of the tensor's largest entry, or rounding of ~0 (a key bias)
            assert (grads["graphed"][n] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-6 * largest, n
        if k == 1:  # the encoders, decoding from the query and from the click, the LLM on two prompt batches
            captured = graphed.graphs.captures
            assert captured == 5
        assert graphed.graphs.captures == captured and graphed.graphs.eager_calls == 0  # the same shapes: replays
    assert any("vision_tower" in n for n in grads["graphed"]) and any("image_encoder" in n for n in grads["graphed"])


def test_parts_past_the_cap_run_eagerly_and_are_counted_in_the_metrics(batch, monkeypatch):
    """A learner whose graphs hold no more signatures runs every part eagerly, and says how often."""
    recipe = load_recipe("recipes/sft_dual.yaml", PRETRAIN)
    learner = Learner(recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu")
    learner.graphs = TrainGraphs(learner.model, max_graphs=0)
    monkeypatch.setattr(TrainGraphs, "applies", staticmethod(lambda *tensors: torch.is_grad_enabled()))
    metrics = learner.step(batch, None, step_generator(0, 1))
    assert metrics["train/graph_eager_calls"] == 5.0  # encoders, two decodings, the LLM twice
    assert learner.graphs.captures == 0 and "train/graph_eager_calls" not in Learner(
        recipe.model, recipe.algo, recipe.optim, recipe.train, "cpu"
    ).step(batch, None, step_generator(0, 1))
