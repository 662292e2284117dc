"""Damaged checkpoints: every file is checked against its manifest (size, sha256) and for non-finite tensors on load;
a bad one is named, the newest intact step is used instead, and pruning never removes it (issue 14)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualrl.checkpoint import (
    FILES,
    CheckpointError,
    load_latest,
    load_trainable_weights,
    read_checkpoint,
    retarget_optimizer,
    save_checkpoint,
)
from dualrl.recipe import OptimSpec, load_recipe
from tests.conftest import TINY, metric_abs


def _learner_state(seed: int) -> dict:
    """A learner's checkpoint state (as `Learner.state_dict` gives it) for a small linear model after one step."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "model": weights,
        "ema": {k: v * 0.5 for k, v in weights.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "skipped_steps": 0,
        "rng": {"torch": torch.get_rng_state(), "python": (3, list(range(625)), None)},
    }


def _save(out, step: int, keep: int = 3):
    return save_checkpoint(out, step, _learner_state(step), {"data_position": 10 * step}, keep)


def _step(state) -> int:
    return state[1]["step"]


def _flip_byte(path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_in_ema_with_a_matching_manifest(folder) -> None:
    """A NaN written into the EMA *and* recorded in the manifest: the bytes verify, the values must not pass."""
    ema = load_file(str(folder / "ema.safetensors"))
    ema["weight"][0, 0] = float("nan")
    save_file(ema, str(folder / "ema.safetensors"))
    if not (folder / "manifest.json").is_file():  # a checkpoint of dualrl before manifests
        return
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "ema.safetensors").read_bytes()
    manifest["files"]["ema.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# Each fault to the newest step, and what the log must say about it.
DAMAGE = {
    "truncated weights": (lambda f: (f / "trainable.safetensors").write_bytes(b"x" * 40), "trainable.safetensors"),
    "deleted EMA": (lambda f: f.joinpath("ema.safetensors").unlink(), "ema.safetensors"),
    "byte flipped in weights": (lambda f: _flip_byte(f / "trainable.safetensors"), "trainable.safetensors"),
    "byte flipped in EMA": (lambda f: _flip_byte(f / "ema.safetensors", 20), "ema.safetensors"),
    "NaN in the EMA": (_nan_in_ema_with_a_matching_manifest, "ema.safetensors: non-finite values in ema.weight"),
    "truncated optimizer": (
        lambda f: f.joinpath("optimizer.pt").write_bytes(f.joinpath("optimizer.pt").read_bytes()[:100]),
        "optimizer.pt",
    ),
    "garbage state": (lambda f: f.joinpath("state.json").write_text("{"), "state.json"),
    "garbage manifest": (lambda f: f.joinpath("manifest.json").write_text("[]"), "manifest.json"),
}


def test_every_file_is_in_the_manifest_and_a_checkpoint_reads_back_as_saved(tmp_path):
    """The manifest lists each file with its size and sha256; an intact checkpoint loads exactly what was saved."""
    folder = _save(tmp_path, 1)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 1 and set(manifest["files"]) == set(FILES)
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    learner_state, run_state = read_checkpoint(folder)
    want = _learner_state(1)
    assert run_state == {"step": 1, "data_position": 10}
    assert all(torch.equal(learner_state["ema"][k], want["ema"][k]) for k in want["ema"])


@pytest.mark.parametrize("fault", list(DAMAGE))
def test_a_damaged_newest_step_is_named_and_the_previous_one_loads(tmp_path, caplog, fault):
    """Truncated, deleted, byte-flipped, NaN-holding or garbage files in the newest step: the file is named in
    the log, and the run resumes from the intact step before it (said in the log), not from the damaged one."""
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    damage, named = DAMAGE[fault]
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="dualrl.checkpoint"):
        state = load_latest(tmp_path)
    assert _step(state) == 1 and state[1]["data_position"] == 10
    assert f"{newest}/{named}" in caplog.text
    assert f"falling back to {tmp_path / 'checkpoints' / 'step_1'}" in caplog.text


@pytest.mark.parametrize("pointer", ["step_9", "", "../../etc"])
def test_a_mispointed_or_deleted_latest_pointer_takes_the_newest_intact_step(tmp_path, caplog, pointer):
    """`latest` naming no step folder (or gone): said in the log, and the newest intact step loads — never a
    silent fresh start that would overwrite the run's metrics."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    latest = tmp_path / "checkpoints" / "latest"
    if pointer:
        latest.write_text(pointer)
    else:
        latest.unlink()
    with caplog.at_level(logging.WARNING, logger="dualrl.checkpoint"):
        assert _step(load_latest(tmp_path)) == 2
    assert str(latest) in caplog.text


def test_no_intact_checkpoint_is_an_error_naming_each_bad_file(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    for step in (1, 2):
        _flip_byte(tmp_path / "checkpoints" / f"step_{step}" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        load_latest(tmp_path)
    for step in (1, 2):
        assert str(tmp_path / "checkpoints" / f"step_{step}" / "optimizer.pt") in str(err.value)


def test_a_latest_pointer_without_any_step_folder_is_an_error_not_a_fresh_start(tmp_path):
    _save(tmp_path, 1)
    shutil.rmtree(tmp_path / "checkpoints" / "step_1")
    with pytest.raises(CheckpointError, match="no step folder is: the run's checkpoints are gone"):
        load_latest(tmp_path)


def test_pruning_keeps_the_step_just_saved_when_a_damaged_newer_one_is_left(tmp_path):
    """Steps 2 and 4 saved, step 4 damaged; the run falls back to step 2 and saves step 3 with keep=1: step 3
    (the newest intact one) stays and `latest` names it; the damaged step 4 goes, not the good one."""
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    _flip_byte(tmp_path / "checkpoints" / "step_4" / "ema.safetensors")
    assert _step(load_latest(tmp_path)) == 2
    _save(tmp_path, 3, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_3"]
    assert _step(load_latest(tmp_path)) == 3


def test_saving_non_finite_weights_is_refused_and_latest_stays(tmp_path):
    _save(tmp_path, 1)
    state = _learner_state(2)
    state["ema"]["bias"][0] = float("inf")
    with pytest.raises(CheckpointError, match=r"step 2: non-finite values in ema\.bias"):
        save_checkpoint(tmp_path, 2, state, {"data_position": 20}, 3)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_1"
    assert not (tmp_path / "checkpoints" / "step_2").exists()


def test_a_step_without_manifest_loads_with_a_warning_but_not_with_nan(tmp_path, caplog):
    """A checkpoint written before checksums loads (said in the log); its values are still checked."""
    folder = _save(tmp_path, 1)
    (folder / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="dualrl.checkpoint"):
        assert _step(load_latest(tmp_path)) == 1
    assert "cannot be verified" in caplog.text
    ema = load_file(str(folder / "ema.safetensors"))
    ema["bias"][1] = float("nan")
    save_file(ema, str(folder / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: non-finite"):
        load_latest(tmp_path)


def test_init_from_weights_are_verified(tmp_path):
    """model.init_from: a run's newest intact step is taken; a step folder named directly must be intact."""
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    _flip_byte(newest / "ema.safetensors")
    ema = load_trainable_weights(tmp_path, "ema")
    assert torch.equal(ema["weight"], _learner_state(1)["ema"]["weight"])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: sha256 differs"):
        load_trainable_weights(newest, "ema")


def test_a_changed_lr_is_applied_to_the_loaded_optimizer_state():
    """The saved optimizer and scheduler carry the old rate; retargeted, the next step runs at the new recipe's
    rate at the saved step of its schedule, and the scheduler goes on from there."""
    from dualrl.workers.learner import _schedule

    state = _learner_state(0)
    optim = OptimSpec(lr=0.02, warmup_ratio=0.0, weight_decay=0.5, betas=(0.8, 0.9))
    retarget_optimizer(state, optim, total_steps=10)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(optim, 10))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.02 * _schedule(optim, 10)(1))
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.5
    scheduler.step()
    assert group["lr"] == pytest.approx(0.02 * _schedule(optim, 10)(2))


RUN = ["train.steps=3", "train.stop_at_step=2", "train.save_every=1", "eval.at_start=false", "eval.every=100"]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A tiny sft_dual run stopped after step 2, with checkpoints of steps 1 and 2."""
    from dualrl.train import run

    out = tmp_path_factory.mktemp("ckpt") / "run"
    run(load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", *RUN]))
    return out


def _copy(two_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    return out


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_whose_latest_step_was_corrupted_in_place_redoes_the_step_from_the_one_before(two_steps, tmp_path):
    """A byte flipped in step 2's EMA: the resume names the file, falls back to step 1, runs step 2 again to the
    same metrics as the first time (not a run that skips every update or scores 0), and leaves intact
    checkpoints of steps 1 and 2."""
    from dualrl.train import run

    out = _copy(two_steps, tmp_path)
    _flip_byte(out / "checkpoints" / "step_2" / "ema.safetensors", -5000)  # a weight's byte
    summary = run(load_recipe("recipes/sft_dual.yaml", [*TINY, f"output_dir={out}", *RUN]))
    assert summary["steps_this_run"] == 1
    first, again = _lines(two_steps), _lines(out)
    assert [m["step"] for m in again] == [m["step"] for m in first] == [1, 2]
    for key in first[1]:
        if not (key.startswith("sync/") or key.endswith("/ms")):
            assert again[1][key] == pytest.approx(first[1][key], rel=1e-5, abs=metric_abs(key, 1e-7)), key
    for step in (1, 2):
        assert _step(read_checkpoint(out / "checkpoints" / f"step_{step}")) == step


def test_export_of_a_run_with_a_corrupt_latest_step_names_it_and_uses_the_intact_one(
    two_steps, tmp_path, capsys, caplog
):
    """`dualrl.export`: the damaged file is named, the newest intact step is exported (SOURCE.txt and the
    command's line say which); with no intact step left, one `error:` line and exit 2."""
    from dualrl.export import main

    out = _copy(two_steps, tmp_path)
    (out / "checkpoints" / "step_2" / "trainable.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dualrl.checkpoint"):
        assert main([str(out), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert "step_2/trainable.safetensors: 0 bytes" in caplog.text and "falling back to" in caplog.text
    assert "at step 1" in (tmp_path / "peft" / "SOURCE.txt").read_text() and "at step 1" in capsys.readouterr().out
    (out / "checkpoints" / "step_1" / "optimizer.pt").unlink()
    assert main([str(out), str(tmp_path / "peft2"), "--format", "peft"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0] and "step_1/optimizer.pt: missing" in errors[0]
