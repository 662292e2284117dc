"""Several learners, rollout and reward workers under Ray (gloo on CPU): N learners on the same global batch make
the update one learner makes with N times the micro-batches; the step's regions split among M rollout and reward
workers; a resume continues with each rank's random state, and with another number of learners."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from dualrl.recipe import load_recipe  # noqa: E402
from dualrl.train import run  # noqa: E402
from tests.conftest import TINY  # noqa: E402

COMMON = [*TINY, "runtime.num_cpus=2", "train.steps=3", "eval.every=3", "eval.at_start=false"]
NO_DROPOUT = "model.trainable.lora_dropout=0.0"  # dropout draws from each rank's own stream
WEIGHT_TOL = 2e-5  # float32; only the order of the gradient sums differs (one process against two)
GRPO = ["algo.name=grpo", "algo.grpo.num_generations=2", "rewards=[{name: mask_iou}, {name: length}]"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One Ray instance for the module's runs (the runtime leaves a caller's instance up): starting and ending Ray
    for each of the 8 runs cost the suite seconds each on 2 cores. The runtime's own start and end are tested in
    tests/runtime/test_ray.py and tests/faults/test_ray_deadlines.py."""
    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)  # as COMMON's runtime.num_cpus=2 would
    yield
    if owned:
        ray.shutdown()


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _max_weight_difference(a, b) -> float:
    worst = 0.0
    for name in ("trainable.safetensors", "ema.safetensors"):
        x = load_file(a / "checkpoints" / "step_3" / name)
        y = load_file(b / "checkpoints" / "step_3" / name)
        assert x.keys() == y.keys()
        worst = max(worst, *((x[k] - y[k]).abs().max().item() for k in x))
    return worst


def _timing(key: str) -> bool:
    return key.startswith("sync/") or key.endswith("/ms")


def _same_as(expected, got, rel: float, abs: float) -> None:
    for a, b in zip(_lines(expected), _lines(got), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if not _timing(key):
                assert b[key] == pytest.approx(a[key], rel=rel, abs=abs), (a["step"], key)


@pytest.mark.parametrize(
    "algo, workers",
    [
        ([], ["runtime.rollout_workers=2", "runtime.reward_workers=2"]),  # and the step's regions split among 2 + 2
        (GRPO, []),  # sampling: split among rollout workers, each would draw from its own seed
    ],
    ids=["sft_dual", "grpo"],
)
def test_two_learners_make_the_update_of_one_with_twice_the_micro_batches(tmp_path, algo, workers):
    one = tmp_path / "one"
    run(load_recipe("recipes/sft_dual.yaml", [*COMMON, *algo, NO_DROPOUT, "optim.accumulation=2", f"output_dir={one}"]))
    two = tmp_path / "two"
    args = [*COMMON, *algo, *workers, NO_DROPOUT, "runtime.kind=ray", "runtime.learners=2", f"output_dir={two}"]
    run(load_recipe("recipes/sft_dual.yaml", args))
    assert _max_weight_difference(one, two) <= WEIGHT_TOL
    _same_as(one, two, rel=2e-3, abs=1e-4)


def test_two_learners_resume_each_rank_under_fsdp_and_with_another_number(tmp_path, caplog):
    """2 learners with dropout on: the run stopped at step 2 and resumed logs what the whole run logs (every rank's
    dropout stream is in the checkpoint), with the weights sent over a collective rather than the object store (the
    same tensors arrive); the layout names every actor. The resumed half shards the weights between the 2 learners
    (runtime.learner_sharding=fsdp): each takes its half of the checkpoint, and the update, the evaluation, the
    weights sent and the checkpoint it writes (whole tensors, optimizer state included) are DDP's. The stopped run
    also resumes with one learner (in-process), and says so."""
    two = ["runtime.kind=ray", "runtime.learners=2", "train.save_every=2"]
    whole = tmp_path / "whole"
    with caplog.at_level(logging.INFO, logger="dualrl"):
        run(load_recipe("recipes/sft_dual.yaml", [*COMMON, *two, f"output_dir={whole}"]))
    layout = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("layout:"))
    assert "learner 0 " in layout and "learner 1 " in layout and "rollout worker " in layout
    split = tmp_path / "split"
    args = [*COMMON, *two, "runtime.weight_sync=collective", f"output_dir={split}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dualrl"):
        run(load_recipe("recipes/sft_dual.yaml", [*args, "train.stop_at_step=2"]))
        shutil.copytree(split, tmp_path / "fewer")
        run(load_recipe("recipes/sft_dual.yaml", [*args, "runtime.learner_sharding=fsdp"]))
    assert caplog.text.count("weights reach the workers through a collective") == 2
    assert "the learners shard the trainable weights (fsdp); each rank holds: 5" in caplog.text
    _same_as(whole, split, rel=1e-4, abs=1e-6)
    assert _max_weight_difference(whole, split) <= WEIGHT_TOL
    saved = [torch.load(r / "checkpoints" / "step_3" / "optimizer.pt")["optimizer"]["state"] for r in (whole, split)]
    assert saved[0].keys() == saved[1].keys()
    for i, state in saved[0].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(saved[1][i][key], state[key], rtol=1e-4, atol=1e-7), (i, key)
    assert {"sync/bytes", "sync/ms"} <= _lines(split)[0].keys()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dualrl"):
        fewer = [*COMMON, "train.save_every=2", f"output_dir={tmp_path / 'fewer'}"]
        summary = run(load_recipe("recipes/sft_dual.yaml", fewer))
    assert summary["complete"] and summary["steps_this_run"] == 1
    assert "written by 2 learner(s), this run has 1" in caplog.text
    assert "runtime.learners" in caplog.text  # the recipe change is logged as applied


def test_async_rollout_makes_the_next_step_while_the_learner_trains(tmp_path):
    """With runtime.async_rollout, step 1's rollout is made in time (staleness 0) and later ones during the step
    before (staleness 1); grpo's first update on an off-policy rollout takes the sampler's log-probs as the old
    policy's, so its ratio is no longer exactly 1 as it is on-policy (grpo: the objective where it matters; the
    stream is the same for sft_dual). Stopped at step 1 and resumed, the run takes step 2's captions and rewards
    from the checkpoint (made with the weights before step 1's update) and logs what the whole run logs. One actor
    of each kind: a step split among several is checked above, and every actor started costs the suite seconds."""
    out = tmp_path / "run"
    args = [*COMMON, *GRPO, "runtime.kind=ray", "runtime.async_rollout=true", "train.save_every=1"]
    summary = run(load_recipe("recipes/sft_dual.yaml", [*args, f"output_dir={out}"]))
    assert summary["complete"]
    steps = [m for m in _lines(out) if "train/loss" in m]
    assert [m["async/staleness"] for m in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["grpo/ratio_mean"] == 1.0
    assert all(m["grpo/ratio_mean"] != 1.0 for m in steps[1:])

    split = tmp_path / "split"
    run(load_recipe("recipes/sft_dual.yaml", [*args, f"output_dir={split}", "train.stop_at_step=1"]))
    run(load_recipe("recipes/sft_dual.yaml", [*args, f"output_dir={split}"]))
    _same_as(out, split, rel=1e-4, abs=1e-6)
