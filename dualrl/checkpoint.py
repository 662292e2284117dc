"""Checkpoints: `output_dir/checkpoints/step_<N>/` plus a `latest` pointer, written atomically and verified on load.

A checkpoint is written into a temporary directory and renamed into place; the `latest` pointer is
replaced with `os.replace`. A crash mid-save leaves the previous checkpoint and pointer intact. Tensors are
stored as safetensors (weights) or read back with `torch.load(weights_only=True)` (optimizer state).

Each step folder holds `manifest.json`: the size and sha256 of every file in it. sha256 is computed by reading
each file back in 8 MiB chunks right after it is written (from the page cache; constant memory, ~1-2 GB/s), so
a save costs one extra read of its bytes and no fsync. A checkpoint is *intact* when every file matches its
manifest entry, parses, and holds finite tensors only. Loading takes the `latest` step if it is intact, else
the newest intact one (the bad file is named in the log); no intact checkpoint at all is an error, never a
silent fresh start. A step folder without a manifest (written before checksums) loads with a warning: it is
parsed and checked for non-finite values, but its bytes cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from dualrl.recipe.section import RecipeError

if TYPE_CHECKING:
    from dualrl.recipe import OptimSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "ema.safetensors", "optimizer.pt", "state.json")
_STEP = re.compile(r"step_(\d+)")
_CHUNK = 8 << 20


class CheckpointError(RecipeError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it. A RecipeError, so
    the command lines print it as one `error:` line."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _nonfinite(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (nested dicts and lists walked)."""
    bad = []
    for name, value in tensors:
        if isinstance(value, dict):
            bad += _nonfinite((f"{name}.{k}", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            bad += _nonfinite((f"{name}.{i}", v) for i, v in enumerate(value))
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, learner_state: dict, run_state: dict, keep: int) -> Path:
    """Write step `step`, point `latest` at it, and prune to the `keep` newest steps up to it. Weights that hold
    NaN or inf are refused before anything is written, so `latest` always names finite weights."""
    root = Path(output_dir) / "checkpoints"
    bad = _nonfinite([("trainable", learner_state["model"]), ("ema", learner_state["ema"])])
    if bad:
        raise CheckpointError(
            f"step {step}: non-finite values in {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}: checkpoint not "
            f"written ({root / 'latest'} still names the last good one); lower optim.lr or look for the step that "
            "diverged in metrics.jsonl"
        )
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(learner_state["model"], tmp / "trainable.safetensors")
    _save_tensors(learner_state["ema"], tmp / "ema.safetensors")
    rng = learner_state["rng"]
    torch.save(
        {
            "optimizer": learner_state["optimizer"],
            "scheduler": learner_state["scheduler"],
            "rng_torch": rng["torch"],
            "rng_cuda": rng.get("cuda"),
            "rank_rng": learner_state.get("rank_rng", []),  # learner ranks 1.. (runtime.learners > 1)
            "ahead": learner_state.get("ahead"),  # the next step's captions and rewards, made ahead (async rollout)
        },
        tmp / "optimizer.pt",
    )
    meta = {"step": step, "skipped_steps": learner_state["skipped_steps"], "rng_python": rng["python"], **run_state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "hash": "sha256", "files": files}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    _prune(root, step, keep)
    return final


def _prune(root: Path, saved: int, keep: int) -> None:
    """Keep the step just saved (the newest intact one) and the `keep - 1` steps before it. Steps after it are
    left from before this run resumed at an earlier step (it fell back past them, or a crash came between writing
    one and pointing `latest` at it): they go too, or they would count as newest and push the good steps out."""
    for step, folder in _step_folders(root):
        if step > saved:
            log.warning("removing %s: newer than step %d just saved, left from before this run resumed", folder, saved)
            shutil.rmtree(folder, ignore_errors=True)
    older = [folder for step, folder in _step_folders(root) if step < saved]
    for folder in older[max(0, keep - 1) :]:
        shutil.rmtree(folder, ignore_errors=True)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_<N>` folder under `root`, newest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _candidates(root: Path) -> list[Path]:
    """The step folders to try, in order: the one `latest` names, then every other one, newest first."""
    folders = [folder for _, folder in _step_folders(root)]
    pointer = root / "latest"
    if not pointer.is_file():
        if folders:
            log.warning("%s is missing: taking the newest intact step folder instead", pointer)
        return folders
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    target = root / name
    if _STEP.fullmatch(name) and target.is_dir():
        return [target, *(f for f in folders if f != target)]
    log.warning("%s names %r, which is not a step folder there: taking the newest intact one instead", pointer, name)
    return folders


def has_checkpoint(output_dir: Path) -> bool:
    """Whether a run in `output_dir` has saved a checkpoint (intact or not): a new start would resume it."""
    root = Path(output_dir) / "checkpoints"
    return (root / "latest").is_file() or bool(_step_folders(root))


def verify_files(folder: Path) -> None:
    """Check every file of a step folder against its manifest (present, same size, same sha256); raises
    CheckpointError naming the first file that differs."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        log.warning("%s has no %s (written before checksums): its files cannot be verified", folder, MANIFEST)
        return
    entries = _read(manifest_path, _read_manifest)
    if entries["step"] != _folder_step(folder):
        raise CheckpointError(f"{manifest_path}: written for step {entries['step']}, not for {folder.name}")
    for name in FILES:
        path = folder / name
        if name not in entries["files"]:
            raise CheckpointError(f"{path}: not listed in {manifest_path}")
        size, digest = entries["files"][name]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing ({MANIFEST} lists it)")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {size} (truncated or replaced)"
            )
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST} (the file changed after it was written)")


def _read_manifest(path: Path) -> dict:
    """{"step": N, "files": {name: (bytes, sha256)}}; a KeyError or ValueError on anything malformed."""
    manifest = json.loads(path.read_text())
    files = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in manifest["files"].items()}
    return {"step": int(manifest["step"]), "files": files}


def _folder_step(folder: Path) -> int:
    match = _STEP.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def _read(path: Path, reader):
    """`reader(path)`, its failure turned into a CheckpointError that names the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return reader(path)
    except Exception as err:  # safetensors, torch.load and json each raise their own kinds on a damaged file
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def _finite(path: Path, tensors: Any) -> Any:
    bad = _nonfinite([(path.stem, tensors)])
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}")
    return tensors


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _finite(path, _read(path, lambda p: load_file(str(p))))


def _read_state(path: Path) -> tuple[int, dict]:
    meta = json.loads(path.read_text())
    return int(meta["step"]), meta


def _read_optimizer(path: Path) -> dict:
    opt = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"optimizer", "scheduler", "rng_torch"} - opt.keys()
    if missing:
        raise KeyError(f"no {', '.join(sorted(missing))}")
    return opt


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(learner_state, run_state) of one step folder, verified; raises CheckpointError naming the bad file."""
    verify_files(folder)
    step, meta = _read(folder / "state.json", _read_state)
    if step != _folder_step(folder) or not {"skipped_steps", "rng_python"} <= meta.keys():
        raise CheckpointError(f"{folder / 'state.json'}: not the state of {folder.name} (says step {step})")
    opt = _read(folder / "optimizer.pt", _read_optimizer)
    _finite(folder / "optimizer.pt", opt["optimizer"].get("state", {}))
    learner_state = {
        "model": _load_tensors(folder / "trainable.safetensors"),
        "ema": _load_tensors(folder / "ema.safetensors"),
        "optimizer": opt["optimizer"],
        "scheduler": opt["scheduler"],
        "skipped_steps": meta.pop("skipped_steps"),
    }
    learner_state["rng"] = {"torch": opt["rng_torch"], "python": meta.pop("rng_python")}
    if opt.get("rng_cuda") is not None:
        learner_state["rng"]["cuda"] = opt["rng_cuda"]
    learner_state["rank_rng"] = opt.get("rank_rng", [])
    learner_state["ahead"] = opt.get("ahead")
    return learner_state, meta


def load_latest(output_dir: Path) -> tuple[dict, dict] | None:
    """(learner_state, run_state) of the newest intact checkpoint, or None for a fresh run (no checkpoint).
    A checkpoint that fails verification is named in the log and the next older one is tried."""
    root = Path(output_dir) / "checkpoints"
    candidates = _candidates(root)
    if not candidates:
        if (root / "latest").is_file():
            raise CheckpointError(
                f"{root / 'latest'} is there but no step folder is: the run's checkpoints are gone. Restore them, or "
                f"move {root} away to start the run over"
            )
        return None
    failures = []
    for folder in candidates:
        try:
            state = read_checkpoint(folder)
        except CheckpointError as err:
            log.warning("checkpoint not intact: %s", err)
            failures.append(str(err))
            continue
        if failures:
            log.warning("falling back to %s, the newest intact checkpoint (%d failed, above)", folder, len(failures))
        return state
    raise CheckpointError(
        f"no intact checkpoint under {root}: " + "; ".join(failures) + ". Restore the files named, or move "
        f"{root} away to start the run over"
    )


def retarget_optimizer(learner_state: dict, optim: OptimSpec, total_steps: int) -> None:
    """Make a loaded optimizer state follow a changed `optim` section: the saved state carries the learning rate,
    betas and weight decay it was made with, which would otherwise win over the recipe's. The next step's rate is
    the new schedule's at the saved step; the moments are kept."""
    from dualrl.workers.learner import _schedule  # the learner's schedule; imports this module

    scheduler = learner_state["scheduler"]
    lr = optim.lr * _schedule(optim, total_steps)(scheduler["last_epoch"])
    groups = learner_state["optimizer"]["param_groups"]
    for group in groups:
        group.update(lr=lr, initial_lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    scheduler["base_lrs"] = [optim.lr] * len(groups)
    scheduler["_last_lr"] = [lr] * len(groups)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run's output_dir, its checkpoints/ folder or a step_N folder -> the step folder to read."""
    path = Path(path)
    if (path / "trainable.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.is_file():
            step = root / pointer.read_text().strip()
            if (step / "trainable.safetensors").is_file():
                return step
    raise FileNotFoundError(
        f"no dualrl checkpoint at {str(path)!r} (expected an output_dir with checkpoints/latest, or a step_N "
        "folder with trainable.safetensors). Run the recipe that makes it first, e.g. `python -m dualrl.launch "
        "recipes/sft_dual.yaml` writes outputs/sft_dual/checkpoints/."
    )


def load_trainable_weights(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The EMA's or the student's trainable tensors of a checkpoint (see `resolve_checkpoint`), verified: a step
    folder named directly must be intact; a run's newest intact step is taken (a bad newer one named in the log)."""
    name = "ema.safetensors" if which == "ema" else "trainable.safetensors"
    step = resolve_checkpoint(path)
    if step == Path(path):
        verify_files(step)
        return _load_tensors(step / name)
    learner_state, _ = load_latest(step.parent.parent)
    return learner_state["ema" if which == "ema" else "model"]
