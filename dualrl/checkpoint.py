"""Checkpoints: `output_dir/checkpoints/step_<N>/` plus a `latest` pointer, written atomically.

A checkpoint is written into a temporary directory and renamed into place; the `latest` pointer is
replaced with `os.replace`. A crash mid-save leaves the previous checkpoint and pointer intact. Tensors are
stored as safetensors (weights) or read back with `torch.load(weights_only=True)` (optimizer state).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


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
    root = Path(output_dir) / "checkpoints"
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
        },
        tmp / "optimizer.pt",
    )
    meta = {"step": step, "skipped_steps": learner_state["skipped_steps"], "rng_python": rng["python"], **run_state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    for old in sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(output_dir: Path) -> tuple[dict, dict] | None:
    """(learner_state, run_state) of the newest complete checkpoint, or None for a fresh run."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    meta = json.loads((ckpt / "state.json").read_text())
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    learner_state = {
        "model": load_file(str(ckpt / "trainable.safetensors")),
        "ema": load_file(str(ckpt / "ema.safetensors")),
        "optimizer": opt["optimizer"],
        "scheduler": opt["scheduler"],
        "skipped_steps": meta.pop("skipped_steps"),
    }
    learner_state["rng"] = {"torch": opt["rng_torch"], "python": meta.pop("rng_python")}
    if opt.get("rng_cuda") is not None:
        learner_state["rng"]["cuda"] = opt["rng_cuda"]
    return learner_state, meta


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
    """The EMA's or the student's trainable tensors of a checkpoint (see `resolve_checkpoint`)."""
    step = resolve_checkpoint(path)
    return load_file(str(step / ("ema.safetensors" if which == "ema" else "trainable.safetensors")))
