"""Run outputs: `metrics.jsonl`, wandb (offline by default) with overlay tables, and a console progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from dualrl.recipe import WandbSpec

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(
        self,
        wandb_spec: WandbSpec,
        total_steps: int,
        label: str,
        output_dir: Path,
        start_step: int,
        config: dict,
        resumed: bool,
    ):
        """`total_steps` and `label` (the algorithm's name) for the progress bar; `config` goes to wandb."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self._truncate_after(start_step if resumed else -1)
        self.file = self.path.open("a")
        self.wandb = _start_wandb(wandb_spec, Path(output_dir), config)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=label, dynamic_ncols=True, mininterval=1.0)
        self.last: dict[str, float] = {}

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint this run starts from (all of them on a fresh start): the
        steps after it run again and log again."""
        if not self.path.exists():
            return
        keep = [line for line, entry in read_metrics(self.path) if entry["step"] <= step] if step >= 0 else []
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """A line of metrics.jsonl (a non-finite value is written null, never dropped: a diverged run shows) and
        of wandb (where it is NaN); None means not measured and is left out."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        self.file.write(json.dumps({"step": step, **null_if_nonfinite(values)}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        self.last.update(values)
        shown = {
            k.split("/")[-1]: f"{self.last[k]:.3g}"
            for k in (
                "train/loss",
                "train/dual_iou",
                "train/ref_iou",
                "reward/total",
                "eval/ref_miou",
                "eval/cycle_miou",
            )
            if k in self.last
        }
        self.bar.set_postfix(shown, refresh=False)

    def logged(self, step: int, prefix: str) -> dict[str, float]:
        """What this run (or the run it resumes) logged at `step` under `prefix`, e.g. the step-0 eval."""
        self.file.flush()
        found: dict[str, float] = {}
        for line in self.path.read_text().splitlines():
            entry = json.loads(line)
            if entry["step"] == step:
                found.update({k: v for k, v in entry.items() if k.startswith(prefix)})
        return found

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def table(self, step: int, rows: list[dict]) -> None:
        """Eval examples as a wandb table: image with the region (green) and the EMA's mask' (red)."""
        if self.wandb is None or not rows:
            return
        import wandb

        columns = ["overlay", "reference", "caption", "cycle_iou", "ref_iou"]
        table = wandb.Table(columns=columns)
        for r in rows:
            table.add_data(
                wandb.Image(overlay(r["image"], r["mask"], r["pred"])),
                r["reference"],
                r["caption"],
                r["cycle_iou"],
                r["ref_iou"],
            )
        self.wandb.log({"eval/examples": table}, step=step)

    def groups(self, step: int, batch: dict, rollout, scored, regions: int = 2) -> None:
        """A few regions with all G of their sampled captions, each reward's score and the total: appended
        to `rollouts.jsonl` and logged as the wandb table `train/rollouts`."""
        g = rollout.group_size
        rows = []
        for r in range(min(regions, len(batch["masks"]))):
            for i in range(r * g, r * g + g):
                rows.append(
                    {
                        "step": step,
                        "region": r,
                        "reference": batch["expression"][r],
                        "caption": rollout.captions.texts[i],
                        "total": float(scored.total[i]),
                        **{k: v[i] for k, v in scored.scores.items()},
                    }
                )
        with (self.path.parent / "rollouts.jsonl").open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.wandb is None or not rows:
            return
        import wandb

        keys = list(scored.scores)
        table = wandb.Table(columns=["region", "overlay", "reference", "caption", "total", *keys])
        for row in rows:
            r = row["region"]
            empty = np.zeros_like(batch["masks"][r].numpy())
            image = wandb.Image(overlay(batch["images"][r].numpy(), batch["masks"][r].numpy(), empty))
            table.add_data(r, image, row["reference"], row["caption"], row["total"], *[row[k] for k in keys])
        self.wandb.log({"train/rollouts": table}, step=step)

    def close(self, summary: dict | None = None) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(summary)
            self.wandb.finish()


def null_if_nonfinite(value: Any) -> Any:
    """`value` with every non-finite float inside (dicts and lists included) turned into None, so that json writes
    null where it would write NaN or Infinity, which are not JSON."""
    if isinstance(value, dict):
        return {k: null_if_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [null_if_nonfinite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, entry) of each line of a metrics.jsonl. A torn last line (the process died while writing it) is
    dropped with a warning; any other line that is not a JSON object with a step is an error naming it."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            int(entry["step"])
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines):
                log.warning("%s: dropped its last line, torn (%s: %r)", path, type(err).__name__, line[:80])
                break
            raise ValueError(
                f"{path}:{number}: not a metrics line ({type(err).__name__}: {err}); delete or mend that line, then "
                "run again"
            ) from err
        entries.append((line, entry))
    return entries


def overlay(image, mask, pred) -> np.ndarray:
    """uint8 HxWx3: the region tinted green, the predicted mask tinted red (both: yellow)."""
    img = np.asarray(image, dtype=np.float32).transpose(1, 2, 0) if image.shape[0] == 3 else np.asarray(image)
    out = img.copy()
    m, p = np.asarray(mask, bool), np.asarray(pred, bool)
    out[m] = 0.5 * out[m] + 0.5 * np.array([0, 255, 0])
    out[p] = 0.5 * out[p] + 0.5 * np.array([255, 0, 0])
    return out.clip(0, 255).astype(np.uint8)


def _start_wandb(spec: WandbSpec, output_dir: Path, config: dict):
    if spec.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: metrics go to metrics.jsonl only")
        return None
    id_file = output_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=spec.project,
        name=spec.name,
        mode=spec.mode,
        dir=str(output_dir),
        config=config,
        id=run_id,
        resume="allow",
    )
    id_file.write_text(run.id)
    return run
