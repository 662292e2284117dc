"""Recipes are validated before any model is built, with messages that name the key and what is allowed."""

from __future__ import annotations

import time

import pytest

from dualrl.launch import main
from dualrl.recipe import RecipeError, load_recipe, parse_override


def test_default_recipe_loads_and_overrides_win():
    """The embedded default validates; a later override of the same key wins; YAML values are typed."""
    r = load_recipe("recipes/sft_dual.yaml", ["optim.lr=1e-3", "optim.lr=2e-3", "train.steps=7"])
    assert r.optim.lr == 2e-3 and r.train.steps == 7 and r.algo.name == "sft_dual"


def test_unknown_key_names_path_and_allowed_keys():
    """A misspelt key fails with its dotted path and the keys allowed in that section."""
    with pytest.raises(RecipeError) as err:
        load_recipe("recipes/sft_dual.yaml", ["optim.learning_rate=1e-3"])
    msg = str(err.value)
    assert "optim.learning_rate: unknown key" in msg and "lr" in msg and "weight_decay" in msg


def test_bad_value_names_allowed_values():
    """A value outside a choice lists the choices; a negative lr is refused with the key path."""
    with pytest.raises(RecipeError) as err:
        load_recipe("recipes/sft_dual.yaml", ["runtime.kind=rayy"])
    assert "runtime.kind" in str(err.value) and "'local' or 'ray'" in str(err.value)
    with pytest.raises(RecipeError, match=r"optim\.lr"):
        load_recipe("recipes/sft_dual.yaml", ["optim.lr=-1"])


def test_missing_files_are_reported():
    """A missing recipe file and a missing pretrained directory each give one clear message."""
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("recipes/nope.yaml")
    with pytest.raises(RecipeError, match=r"model\.pretrained: no dualrl model at '/no/such/dir'"):
        load_recipe("recipes/sft_dual.yaml", ["model.pretrained=/no/such/dir"])


def test_override_syntax():
    """Overrides are dotted.key=value; anything else is refused."""
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=null") == ("a", None)
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(RecipeError):
            parse_override(bad)


def test_launch_rejects_before_building(capsys):
    """The CLI exits with status 2 and one message, quickly: no model is built for a bad recipe."""
    t0 = time.time()
    assert main(["recipes/sft_dual.yaml", "algo.name=ppo"]) == 2
    assert time.time() - t0 < 5
    err = capsys.readouterr().err
    assert err.startswith("error: invalid recipe") and "algo.name" in err and "'pretrain', 'sft_dual' or 'grpo'" in err


def test_grpo_recipe_needs_its_starting_run():
    """grpo_dual continues from the sft_dual default's output; when that run is missing, the message says
    which key, what was expected and the command that makes it."""
    with pytest.raises(RecipeError) as err:
        load_recipe("recipes/grpo_dual.yaml", ["model.init_from=/no/such/run"])
    msg = str(err.value)
    assert msg.startswith("model.init_from: no dualrl checkpoint at '/no/such/run'")
    assert "python -m dualrl.launch recipes/sft_dual.yaml" in msg


def test_reward_entries_are_checked_at_load():
    """A reward that cannot be found or takes other options fails the recipe with its list position."""
    with pytest.raises(RecipeError, match=r"rewards\[1\] \(lenght\): unknown reward 'lenght'"):
        load_recipe("recipes/sft_dual.yaml", ["rewards=[{name: mask_iou}, {name: lenght}]"])
    with pytest.raises(RecipeError, match=r"rewards\[0\] \(mask_iou\): unknown option\(s\) \['sof'\]"):
        load_recipe("recipes/sft_dual.yaml", ["rewards=[{name: mask_iou, sof: true}]"])
    with pytest.raises(RecipeError, match="two plugins log under the same name"):
        load_recipe("recipes/sft_dual.yaml", ["rewards=[{name: length}, {name: rewards.shaping:length}]"])
    with pytest.raises(RecipeError, match="needs at least one reward with a non-zero weight"):
        load_recipe("recipes/sft_dual.yaml", ["algo.name=grpo", "rewards=[{name: length, weight: 0}]"])


def test_list_entries_take_indexed_overrides():
    """`rewards.1.weight=0.5` reaches into the list; an index past its end is refused."""
    r = load_recipe("recipes/sft_dual.yaml", ["rewards=[{name: mask_iou}, {name: length}]", "rewards.1.weight=0.5",
                                              "rewards.1.max_words=9"])
    assert r.rewards[1].weight == 0.5 and r.rewards[1].options == {"max_words": 9}
    with pytest.raises(RecipeError, match="'2' is not an index of a 2-entry list"):
        load_recipe("recipes/sft_dual.yaml", ["rewards=[{name: mask_iou}, {name: length}]", "rewards.2.weight=1"])
