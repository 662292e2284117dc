"""Several learners, rollout and reward workers under Ray (gloo on CPU): N learners on the same global batch make
the update one learner makes with N times the micro-batches; the step's regions split among M rollout and reward
workers; a resume continues with each rank's random state, and with another number of learners."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from dualrl.recipe import load_recipe  # noqa: E402
from dualrl.train import run  # noqa: E402
from tests.conftest import TINY  # noqa: E402

COMMON = [*TINY, "runtime.num_cpus=2", "train.steps=3", "eval.every=3", "eval.at_start=false"]
NO_DROPOUT = "model.trainable.lora_dropout=0.0"  # dropout draws from each rank's own stream
WEIGHT_TOL = 2e-5  # float32; only the order of the gradient sums differs (one process against two)
GRPO = ["algo.name=grpo", "algo.grpo.num_generations=2", "rewards=[{name: mask_iou}, {name: length}]"]


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


@pytest.mark.parametrize("algo", [[], GRPO], ids=["sft_dual", "grpo"])
def test_two_learners_make_the_update_of_one_with_twice_the_micro_batches(tmp_path, algo):
    one = tmp_path / "one"
    run(load_recipe("recipes/sft_dual.yaml", [*COMMON, *algo, NO_DROPOUT, "optim.accumulation=2", f"output_dir={one}"]))
    two = tmp_path / "two"
    run(
        load_recipe(
            "recipes/sft_dual.yaml",
            [*COMMON, *algo, NO_DROPOUT, "runtime.kind=ray", "runtime.learners=2", f"output_dir={two}"],
        )
    )
    assert _max_weight_difference(one, two) <= WEIGHT_TOL
    for a, b in zip(_lines(one), _lines(two), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if not _timing(key):
                assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-4), (a["step"], key)


def test_the_default_recipe_runs_with_two_of_each_worker_and_resumes_each_rank(tmp_path, caplog):
    """2 learners, 2 rollout and 2 reward workers: the run stopped at step 2 and resumed logs what the whole run
    logs (every rank's dropout stream is in the checkpoint), with the weights sent over a collective rather than
    the object store (the same tensors arrive); the layout names every actor. The stopped run also resumes with one
    learner, and says so."""
    workers = ["runtime.kind=ray", "runtime.learners=2", "runtime.rollout_workers=2", "runtime.reward_workers=2"]
    whole = tmp_path / "whole"
    with caplog.at_level(logging.INFO, logger="dualrl"):
        run(load_recipe("recipes/sft_dual.yaml", [*COMMON, *workers, "train.save_every=2", f"output_dir={whole}"]))
    layout = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("layout:"))
    for role in ("learner", "rollout worker", "reward worker"):
        assert f"{role} 0 " in layout and f"{role} 1 " in layout
    split = tmp_path / "split"  # and the weights broadcast over a gloo group instead of the object store
    args = [*COMMON, *workers, "train.save_every=2", "runtime.weight_sync=collective", f"output_dir={split}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dualrl"):
        run(load_recipe("recipes/sft_dual.yaml", [*args, "train.stop_at_step=2"]))
        shutil.copytree(split, tmp_path / "fewer")
        run(load_recipe("recipes/sft_dual.yaml", args))
    assert caplog.text.count("weights reach the workers through a collective") == 2
    for a, b in zip(_lines(whole), _lines(split), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if not _timing(key):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert {"sync/bytes", "sync/ms"} <= _lines(split)[0].keys()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dualrl"):
        fewer = [*COMMON, "runtime.kind=ray", "train.save_every=2", f"output_dir={tmp_path / 'fewer'}"]
        summary = run(load_recipe("recipes/sft_dual.yaml", fewer))
    assert summary["complete"] and summary["steps_this_run"] == 1
    assert "written by 2 learner(s), this run has 1" in caplog.text
    assert "runtime.learners" in caplog.text  # the recipe change is logged as applied


def test_async_rollout_makes_the_next_step_while_the_learner_trains(tmp_path):
    """With runtime.async_rollout, step 1's rollout is made in time (staleness 0) and later ones during the step
    before (staleness 1); grpo's first update on an off-policy rollout takes the sampler's log-probs as the old
    policy's, so its ratio is no longer exactly 1 as it is on-policy (grpo: the objective where it matters; the
    stream is the same for sft_dual)."""
    workers = ["runtime.learners=2", "runtime.rollout_workers=2", "runtime.reward_workers=2"]
    out = tmp_path / "run"
    args = [*COMMON, *GRPO, *workers, "runtime.kind=ray", "runtime.async_rollout=true", f"output_dir={out}"]
    summary = run(load_recipe("recipes/sft_dual.yaml", args))
    assert summary["complete"]
    steps = [m for m in _lines(out) if "train/loss" in m]
    assert [m["async/staleness"] for m in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["grpo/ratio_mean"] == 1.0
    assert all(m["grpo/ratio_mean"] != 1.0 for m in steps[1:])
