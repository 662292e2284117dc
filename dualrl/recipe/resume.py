"""Which recipe keys a resumed run may change, and the check of a new recipe against the one the run was started
with (its `recipe.yaml`).

A run started again on the same output_dir resumes from its checkpoint. A key that decides what the checkpoint's
tensors *are* (architecture, LoRA rank, trainable set), what they were trained *for* (objective, rewards), or
which data the saved position indexes cannot change: the resume stops with the list of such differences. A key
that says how the run *goes on* (length, learning rate, logging, where workers run) may change: it is applied
from the next step and logged as changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualrl.recipe.load import resolve_recipe
from dualrl.recipe.schema import Recipe
from dualrl.recipe.section import RecipeError

# Every recipe key falls under the longest prefix listed here: (may change on resume, why). A key added to the
# recipe inherits its section's rule; tests/faults/test_resume_recipe.py checks that every key has one.
RESUME_KEYS: dict[str, tuple[bool, str]] = {
    "output_dir": (True, "a run moved to another folder resumes there"),
    "model": (False, "the architecture, starting weights, trainable set and prompts the checkpoint's tensors fit"),
    "model.attn_implementation": (True, "attention kernels: how fast, not what is computed"),
    "model.gradient_checkpointing": (True, "memory against compute; the same gradients"),
    "model.train_compile": (True, "how the learner's blocks run: the same gradients up to rounding"),
    "model.train_compile_wrapper": (True, "how the learner's compiled blocks are called: the same kernels"),
    "model.train_fuse_projections": (True, "how the learner's projections run: the same gradients up to rounding"),
    "model.train_graphs": (True, "how the learner's fixed-shape parts run: the same gradients up to rounding"),
    "model.generation": (True, "the decoding machinery; the same sampling"),
    "model.generation_cache": (True, "the decoding machinery; the same sampling"),
    "model.decode_graphs": (True, "the decoding machinery; the same sampling"),
    "model.decode_compile": (True, "the decoding machinery; the same sampling"),
    "model.decode_merge_lora": (True, "the decoding machinery; the same sampling"),
    "model.decode_fuse_projections": (True, "the decoding machinery; the same sampling"),
    "data": (False, "the stream the checkpoint's data position indexes, and the held-out set eval/* measures on"),
    "data.num_workers": (True, "how samples are decoded, not which ones or in what order"),
    "data.prefetch": (True, "how samples are decoded, not which ones or in what order"),
    "data.chunk": (True, "how samples are decoded, not which ones or in what order"),
    "data.receive_thread": (True, "where samples are received, not which ones or in what order"),
    "data.cache_dir": (True, "where the file index is cached"),
    "algo": (False, "the objective and its losses: the run would be another experiment"),
    "rewards": (False, "what reward/total, grpo's training signal, means"),
    "optim": (True, "applied to the loaded optimizer state (lr, betas, weight decay) or read at each step"),
    "train": (True, "how long the run goes, how it logs and saves, where it runs"),
    "train.seed": (False, "model.seed and data.seed follow it: the model's init and the data stream"),
    "eval": (True, "when and in what batches the held-out set is evaluated"),
    "eval.split": (False, "eval/* would switch held-out sets mid-run"),
    "runtime": (True, "where the workers run: a run is the same in-process or in Ray actors"),
    "wandb": (True, "logging only"),
}


@dataclass(frozen=True)
class Change:
    """A key whose value differs between the saved recipe and the new one."""

    key: str
    saved: Any
    new: Any
    may_change: bool
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.new!r} ({self.why})"


def rule(key: str) -> tuple[bool, str]:
    """(may change on resume, why) for a dotted recipe key: the entry of its longest listed prefix."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RESUME_KEYS:
            return RESUME_KEYS[prefix]
    return False, "not in dualrl.recipe.resume.RESUME_KEYS, so held fixed"


def _differences(saved: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved, new) of every leaf that differs; a list or a section switched on/off is one leaf."""
    if isinstance(saved, dict) and isinstance(new, dict):
        found = []
        for name in dict.fromkeys([*saved, *new]):
            found += _differences(saved.get(name), new.get(name), f"{key}.{name}" if key else name)
        return found
    return [] if saved == new else [(key, saved, new)]


def recipe_changes(saved: Recipe, new: Recipe) -> list[Change]:
    """Every key whose value differs, with its rule."""
    pairs = _differences(saved.model_dump(mode="json"), new.model_dump(mode="json"))
    return [Change(key, a, b, *rule(key)) for key, a, b in pairs]


def check_resume(saved_path: Path, new: Recipe) -> list[Change]:
    """The changes a resume from the run whose recipe is `saved_path` applies; a RecipeError listing the keys
    that may not change, if any do."""
    try:
        saved = resolve_recipe(saved_path)
    except RecipeError as err:
        raise RecipeError(
            f"{saved_path}: the recipe this run was started with does not load ({err}); a new output_dir starts a "
            "new run"
        ) from None
    changes = recipe_changes(saved, new)
    fixed = [c for c in changes if not c.may_change]
    if fixed:
        raise RecipeError(
            f"resume refused: {len(fixed)} key(s) differ from {saved_path} and cannot change in a resumed run:\n"
            + "\n".join(f"  {c}" for c in fixed)
            + "\nSet them back to the saved values, or give a new output_dir to start a new run."
        )
    return changes
