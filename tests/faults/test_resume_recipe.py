"""Resuming with a changed recipe: keys that cannot change stop the resume with the list of differences before
anything is built or rewritten; keys that may change are applied and logged; a torn metrics line is dropped
(issue 14)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from dualrl.logger import RunLogger
from dualrl.recipe import DataSpec, Recipe, RecipeError, RefCocoSpec, WandbSpec, load_recipe
from dualrl.recipe.resume import RESUME_KEYS, check_resume, recipe_changes
from dualrl.recipe.section import Section, section_type
from dualrl.workers.learner import _schedule
from tests.conftest import TINY


def _keys(cls: type[Section], prefix: str = "") -> list[str]:
    """Every dotted key of a recipe section, sub-sections (also those off by default, like data.refcoco) walked."""
    keys = []
    for name, field in cls.model_fields.items():
        inner = section_type(field.annotation)
        key = f"{prefix}{name}"
        if inner is not None and issubclass(inner, Section):
            keys += _keys(inner, key + ".")
        else:
            keys.append(key)
    return keys


def test_every_recipe_key_has_a_resume_rule():
    """RESUME_KEYS covers the whole recipe by prefix, so no key falls to the default by oversight."""
    keys = _keys(Recipe)
    assert {"optim.lr", "model.trainable.lora_r", "algo.name", "data.refcoco.root"} <= set(keys)
    uncovered = [k for k in keys if not any(k == p or k.startswith(p + ".") for p in RESUME_KEYS)]
    assert not uncovered


def _recipe(out, *extra) -> Recipe:
    return load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", *extra])


def test_changes_are_sorted_into_those_a_resume_applies_and_those_it_refuses(tmp_path):
    saved = _recipe(tmp_path)
    new = _recipe(
        tmp_path / "moved",
        "optim.lr=3e-4",
        "train.steps=500",
        "wandb.table_rows=2",
        "model.trainable.lora_r=4",
        "algo.name=pretrain",
        "data.batch_size=2",
    )
    changes = {c.key: c for c in recipe_changes(saved, new)}
    assert {k for k, c in changes.items() if c.may_change} == {
        "output_dir",
        "optim.lr",
        "train.steps",
        "wandb.table_rows",
    }
    assert {k for k, c in changes.items() if not c.may_change} == {
        "model.trainable.lora_r",
        "algo.name",
        "data.batch_size",
    }
    assert (changes["optim.lr"].saved, changes["optim.lr"].new) == (1e-4, 3e-4)
    data = DataSpec(refcoco=RefCocoSpec(root="r", images="i"))
    switched = recipe_changes(saved, saved.model_copy(update={"data": data}))
    assert "data.refcoco" in {c.key for c in switched} and not any(c.may_change for c in switched)


RUN = ["train.steps=3", "train.save_every=1", "eval.at_start=false", "eval.every=100"]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A tiny sft_dual run stopped after step 1 (checkpoint step_1), as an interrupted run is."""
    from dualrl.train import run

    out = tmp_path_factory.mktemp("resume") / "run"
    run(_recipe(out, *RUN, "train.stop_at_step=1"))
    return out


def _copy(one_step, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    return out


def test_a_changed_lora_rank_or_objective_stops_the_resume_before_anything_is_built_or_rewritten(
    one_step, tmp_path, monkeypatch
):
    """lora_r and algo.name changed: one error lists both with their saved and new values, raised before a model
    is built; recipe.yaml, the checkpoints and metrics.jsonl are as they were, so the run still exports."""
    import dualrl.train as train
    from dualrl.export import main as export

    out = _copy(one_step, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def no_build(recipe):
        raise AssertionError("the runtime was started before the recipe was checked")

    monkeypatch.setattr(train, "start_runtime", no_build)
    with pytest.raises(RecipeError) as err:
        train.run(_recipe(out, *RUN, "model.trainable.lora_r=4", "algo.name=pretrain", "optim.lr=1e-3"))
    message = str(err.value)
    assert "model.trainable.lora_r: 8 -> 4" in message and "algo.name: 'sft_dual' -> 'pretrain'" in message
    assert "optim.lr" not in message and str(out / "recipe.yaml") in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert export([str(out), str(tmp_path / "peft"), "--format", "peft"]) == 0


def test_the_launcher_says_a_refused_resume_in_one_error_line(one_step, tmp_path, capsys):
    """`python -m dualrl.launch` on a run with a changed LoRA rank: exit 2 and one `error:` line, no traceback."""
    from dualrl.launch import main

    out = _copy(one_step, tmp_path)
    argv = ["recipes/sft_dual.yaml", *TINY, f"output_dir={out}", *RUN, "model.trainable.lora_r=4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model.trainable.lora_r: 8 -> 4" in err[0]


def test_a_changed_lr_and_length_are_applied_and_logged(one_step, tmp_path, caplog):
    """optim.lr and train.steps changed on resume: the log names both, the optimizer runs at the new rate on the
    new schedule (not the saved rate, which used to win), and recipe.yaml records the new values."""
    from dualrl.train import run

    out = _copy(one_step, tmp_path)
    recipe = _recipe(out, *RUN, "train.steps=4", "optim.lr=1e-3", "train.stop_at_step=2")
    with caplog.at_level(logging.INFO, logger="dualrl"):
        run(recipe)
    assert "optim.lr: 0.0001 -> 0.001" in caplog.text and "train.steps: 3 -> 4" in caplog.text
    step2 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert step2["step"] == 2
    assert step2["train/lr"] == pytest.approx(1e-3 * _schedule(recipe.optim, 4)(2))
    saved = load_recipe(out / "recipe.yaml")
    assert saved.optim.lr == 1e-3 and saved.train.steps == 4


def test_check_resume_names_a_saved_recipe_that_no_longer_loads(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model: {no_such_key: 1}\noutput_dir: x\n")
    with pytest.raises(RecipeError, match=r"recipe\.yaml: the recipe this run was started with does not load"):
        check_resume(tmp_path / "recipe.yaml", _recipe(tmp_path))


def _logger(out, start_step: int) -> RunLogger:
    return RunLogger(WandbSpec(mode="disabled"), 10, "sft_dual", out, start_step, {}, resumed=True)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    """A process killed while writing metrics.jsonl leaves half a line: the resume drops it (said in the log)
    instead of dying with JSONDecodeError; the lines up to the checkpoint stay."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.4}\n{"step": 3, "train/lo')
    with caplog.at_level(logging.WARNING, logger="dualrl.logger"):
        logger = _logger(tmp_path, 2)
    logger.close()
    assert "dropped its last line, torn" in caplog.text and str(path) in caplog.text
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_damaged_line_inside_metrics_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics line"):
        _logger(tmp_path, 2)
