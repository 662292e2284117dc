"""Recipes are validated before any model is built, with messages that name the key and what is allowed."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dualrl.launch import main
from dualrl.recipe import DERIVED, Recipe, RecipeError, dump_recipe, load_recipe, parse_override
from tests.conftest import REAL_DATA_OFF


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
    r = load_recipe(
        "recipes/sft_dual.yaml",
        ["rewards=[{name: mask_iou}, {name: length}]", "rewards.1.weight=0.5", "rewards.1.max_words=9"],
    )
    assert r.rewards[1].weight == 0.5 and r.rewards[1].options == {"max_words": 9}
    with pytest.raises(RecipeError, match="'2' is not an index of a 2-entry list"):
        load_recipe("recipes/sft_dual.yaml", ["rewards=[{name: mask_iou}, {name: length}]", "rewards.2.weight=1"])


def test_extends_merges_sections_key_by_key(tmp_path):
    from dualrl.recipe import RecipeError, load_recipe

    (tmp_path / "base.yaml").write_text("output_dir: a\ntrain: {steps: 7, log_every: 3}\nmodel: {seed: 4}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v.yaml").write_text("extends: ../base.yaml\noutput_dir: b\ntrain: {steps: 9}\n")
    r = load_recipe(tmp_path / "sub" / "v.yaml", ["model.pretrained=null"])
    assert (r.output_dir, r.train.steps, r.train.log_every, r.model.seed) == ("b", 9, 3, 4)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nope.yaml\n")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


SA2VA_RECIPES = [
    f"sa2va_{size}_{kind}" for size in ("1b", "4b", "8b") for kind in ("sft_dual", "sft_dual_short", "grpo")
] + [f"sa2va_internvl3_{size}_{kind}" for size in ("2b", "8b") for kind in ("sft_dual", "grpo")]
SA2VA_RECIPES += ["sa2va_4b_sft_dual_8gpu"]  # one node of 8 GPUs


def _stated_or_left(section, key: str, checkpoint_value) -> bool:
    """The recipe leaves `key` to the checkpoint (it is not set in any of its files), or states the same value."""
    return key not in section.model_fields_set or getattr(section, key) == checkpoint_value


@pytest.mark.parametrize("name", SA2VA_RECIPES)
def test_sa2va_recipes_validate_and_name_missing_paths(name):
    from dualrl.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"model\.sa2va: no Sa2VA checkpoint at '/models/Sa2VA-"):
        load_recipe(f"recipes/sa2va/{name}.yaml")
    off = ["model.sa2va=null", *REAL_DATA_OFF]
    r = load_recipe(f"recipes/sa2va/{name}.yaml", off)
    assert r.model.precision == "bf16" and r.model.trainable.lora_r == 128 and r.optim.lr == 1e-5
    assert r.algo.ema_decay == 0.999
    # the architecture is the checkpoint's: a recipe leaves it out, or states the checkpoint's value
    assert _stated_or_left(r.model.sam, "image_size", 1024) and _stated_or_left(r.model.vision, "image_size", 448)
    assert (r.algo.loss.bce_weight, r.algo.loss.dice_weight, r.algo.loss.llm_weight) == (2.0, 0.5, 1.0)
    # a 7-8B LLM recomputes activations in micro-batches of 2 (Sa2VA's setting); smaller ones take 2 micro-batches
    # without recomputation (both fit an 80 GB card); every one compiles its decode step
    big = name.startswith(("sa2va_8b", "sa2va_internvl3_8b"))
    assert (r.optim.accumulation, r.model.gradient_checkpointing) == ((4, True) if big else (2, False))
    assert r.model.decode_compile and r.model.generation == "engine"
    assert _stated_or_left(r.model.prompts, "answer_end", "<|end|>" if name.startswith("sa2va_4b") else "<|im_end|>")
    internlm2 = name.startswith("sa2va_8b")
    assert _stated_or_left(r.model.text, "arch", "internlm2" if internlm2 else "qwen2")
    assert r.model.trust_remote_code == internlm2
    assert (r.algo.name == "grpo") == name.endswith("grpo") and (r.train.steps == 50) == ("short" in name)
    if name.endswith("grpo"):
        assert r.algo.grpo.num_generations == 8 and r.model.init_weights == "ema"


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict as {dotted.key: value}."""
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_8gpu_recipe_is_the_one_gpu_recipe_spread_over_eight_actors():
    """sa2va_4b_sft_dual_8gpu.yaml changes only where the run goes and the batch: 8 Ray actors of one GPU each
    (4 learners, 2 rollout and 2 reward workers), and 8 regions per learner in micro-batches of 4, as the one-GPU
    recipe's learner takes; each actor's torch threads are the CPUs it asks for."""
    off = ["model.sa2va=null", *REAL_DATA_OFF]
    one = load_recipe("recipes/sa2va/sa2va_4b_sft_dual.yaml", off)
    eight = load_recipe("recipes/sa2va/sa2va_4b_sft_dual_8gpu.yaml", off)
    before = _flat(one.model_dump())
    changed = {key for key, value in _flat(eight.model_dump()).items() if before.get(key) != value}
    assert changed == {
        "output_dir", "data.batch_size", "train.threads", "runtime.kind", "runtime.learners",
        "runtime.rollout_workers", "runtime.reward_workers", "runtime.worker_gpus", "runtime.worker_cpus",
    }  # fmt: skip
    r = eight.runtime
    assert (r.kind, r.weight_sync, r.async_rollout) == ("ray", "auto", False)
    assert (r.learners + r.rollout_workers + r.reward_workers) * r.worker_gpus == 8
    assert eight.train.threads == r.worker_cpus  # each actor's torch threads: the CPUs it asks for
    assert eight.data.batch_size == r.learners * eight.optim.accumulation * 4
    assert eight.data.batch_size // r.learners == one.data.batch_size


def test_sharded_learners_refuse_compiled_blocks_and_shared_cards():
    from dualrl.recipe import RecipeError, load_recipe

    fsdp = ["runtime.kind=ray", "runtime.learners=2", "runtime.learner_sharding=fsdp"]
    assert load_recipe("recipes/sft_dual.yaml", fsdp).runtime.learner_sharding == "fsdp"
    with pytest.raises(RecipeError, match=r"runtime\.learner_sharding=fsdp with model\.train_compile"):
        load_recipe("recipes/sft_dual.yaml", [*fsdp, "model.train_compile=true"])
    with pytest.raises(RecipeError, match=r"learners sharing a card talk over gloo"):
        load_recipe("recipes/sft_dual.yaml", [*fsdp, "runtime.worker_gpus=0.5"])
    with pytest.raises(RecipeError, match=r"learners asking 0.5 GPU"):
        load_recipe("recipes/sft_dual.yaml", [*fsdp, "runtime.worker_gpus=1", "runtime.learner_gpus=0.5"])
    # learners on cards of their own, the workers sharing others
    own = load_recipe("recipes/sft_dual.yaml", [*fsdp, "runtime.worker_gpus=0.5", "runtime.learner_gpus=1"]).runtime
    assert (own.gpus("learner"), own.gpus("rollout worker"), own.gpus("reward worker")) == (1, 0.5, 0.5)
    assert own.all_gpus() == 3
    tenths = load_recipe("recipes/sft_dual.yaml", ["runtime.worker_gpus=0.1", "runtime.learner_gpus=0.7"]).runtime
    assert tenths.all_gpus() == 0.9  # not 0.8999999999999999: the Slurm script compares it with the GPUs it has


def test_extends_takes_a_list_merged_in_order(tmp_path):
    from dualrl.recipe import RecipeError, load_recipe

    (tmp_path / "a.yaml").write_text("output_dir: a\ntrain: {steps: 7, log_every: 3}\n")
    (tmp_path / "b.yaml").write_text("train: {steps: 9}\nmodel: {seed: 2}\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\nmodel: {seed: 5}\n")
    r = load_recipe(tmp_path / "c.yaml", ["model.pretrained=null"])
    assert (r.output_dir, r.train.steps, r.train.log_every, r.model.seed) == ("a", 9, 3, 5)
    (tmp_path / "d.yaml").write_text("extends: {a: 1}\n")
    with pytest.raises(RecipeError, match="takes a recipe file or a list"):
        load_recipe(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    "name",
    [
        "sft_dual",
        "grpo_dual",
        "pretrain_tiny",
        "pretrain_tiny_wide",
        "pretrain_tiny_medium",
        "sft_dual_wide",
        "grpo_dual_wide",
    ],
)
def test_top_level_recipes_validate(name):
    from dualrl.recipe import load_recipe

    r = load_recipe(f"recipes/{name}.yaml", ["model.init_from=null"])
    assert r.model.sam.image_size == 256
    if name == "pretrain_tiny_wide":  # the wider tiny size of the pretraining calibration, otherwise pretrain_tiny
        assert (r.model.vision.hidden_size, r.model.vision.image_size, r.model.text.hidden_size) == (128, 224, 256)
        assert r.algo.name == "pretrain" and r.data.batch_size == 64 and r.model.pretrained is None
    if r.model.pretrained:  # a recipe states its checkpoint's architecture (else the build stops with the differences)
        from dualrl.model.build import check_arch

        check_arch(r.model, Path(r.model.pretrained))


def _all_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted key, field) of every field under `model`, into nested sections, optional ones and list entries."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        out.append((key, field))
        candidates = [field.annotation, *get_args(field.annotation)]
        for inner in candidates:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                out += _all_fields(inner, key + (".N" if get_origin(field.annotation) is list else ""))
    return out


def test_every_field_has_help():
    """Every key of every section, nested ones included, carries help text (`Field(description=...)`)."""
    fields = _all_fields(Recipe)
    keys = {k for k, _ in fields}
    assert {"data.openimages.masks", "rewards.N.timeout_s", "model.sam.pe_gain", "algo.grpo.beta"} <= keys
    missing = [k for k, f in fields if not (f.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


def test_derived_keys_follow_their_source_unless_set():
    """model.seed and data.seed follow train.seed, algo.grpo.max_completion_length follows
    model.max_caption_tokens; a value of their own wins; each one's help names its source."""
    r = load_recipe("recipes/sft_dual.yaml", ["train.seed=3", "model.max_caption_tokens=9"])
    assert (r.model.seed, r.data.seed, r.algo.grpo.max_completion_length) == (3, 3, 9)
    r = load_recipe("recipes/sft_dual.yaml", ["train.seed=3", "data.seed=5", "algo.grpo.max_completion_length=4"])
    assert (r.model.seed, r.data.seed, r.algo.grpo.max_completion_length) == (3, 5, 4)
    fields = dict(_all_fields(Recipe))
    for key, source in DERIVED.items():
        assert source in fields[key].description and "null" in fields[key].description, key
    with pytest.raises(RecipeError, match=r"data\.seed follows train\.seed=-1: .*greater than or equal to 0"):
        load_recipe("recipes/sft_dual.yaml", ["train.seed=-1"])
    assert load_recipe("recipes/sft_dual.yaml", ["train.seed=-1", "data.seed=0"]).model.seed == -1


def test_dumped_recipe_loads_back_the_same(tmp_path):
    """The resolved recipe a run writes (derived keys filled in) loads back to the same recipe."""
    r = load_recipe("recipes/grpo_dual.yaml", ["model.init_from=null", "train.seed=2"])
    (tmp_path / "recipe.yaml").write_text(dump_recipe(r))
    assert load_recipe(tmp_path / "recipe.yaml") == r


def test_unknown_key_in_an_optional_section_lists_its_keys():
    """A misspelt key inside a section that may be null (data.shapes) names the keys allowed there."""
    with pytest.raises(RecipeError, match=r"data\.shapes\.val_siz: unknown key; allowed here: weight, .*val_size"):
        load_recipe("recipes/sft_dual.yaml", ["data.shapes.val_siz=3"])


def test_launch_help_prints_every_key_with_value_default_and_help(tmp_path, capsys, monkeypatch):
    """`launch RECIPE --help` prints each key with its type, the recipe's value (overrides applied), its default
    and its help, grouped by section; it trains nothing (dualrl.train is never imported) and writes nothing."""
    monkeypatch.setitem(sys.modules, "dualrl.train", None)  # importing it would raise
    out_dir = tmp_path / "run"
    args = ["recipes/grpo_dual.yaml", "--help", "train.steps=7", f"output_dir={out_dir}", "model.init_from=/no/run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert not out_dir.exists()
    assert "model.sam.image_size (int, > 0, <= 4096) = 256  (default 128)" in out
    assert "SAM2's square input in pixels" in out
    assert "train.steps (int, > 0, <= 10000000) = 7  (default 200)" in out
    assert "model.seed (int | null) = 0  (default null: same as train.seed)" in out
    assert "[data.refcoco] (off: null in this recipe" in out and "data.refcoco.root (str) = -  (required)" in out
    assert "rewards.1.workers = 2  (the plugin's own option)" in out
    for key, _ in _all_fields(Recipe):
        if ".N." not in key and not key.startswith("rewards."):
            assert f"\n  {key} (" in out or f"\n[{key}]" in out, key
    # a missing starting run is said after the keys, not instead of them
    assert "note: this recipe does not start as it stands: model.init_from: no dualrl checkpoint" in out


def test_launch_help_without_recipe_and_with_a_bad_one(capsys):
    """Without a recipe --help prints the usage; a recipe that does not validate gives the usual error."""
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m dualrl.launch [-h] recipe [overrides ...]")
    assert main(["recipes/sft_dual.yaml", "--help", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid recipe: optim.lr")


def test_cpp_wrapper_without_compiled_blocks_is_refused():
    """model.train_compile_wrapper=cpp alone would change nothing; the recipe says what is missing."""
    with pytest.raises(RecipeError, match=r"train_compile_wrapper=cpp.*set train_compile=true"):
        load_recipe("recipes/sft_dual.yaml", ["model.train_compile_wrapper=cpp"])
    spec = load_recipe("recipes/sft_dual.yaml", ["model.train_compile_wrapper=cpp", "model.train_compile=true"]).model
    assert spec.train_compile_wrapper == "cpp"
