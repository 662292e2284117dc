"""Learner: owns the student model, its optimizer and schedule, and the EMA of its trainable weights.

`step` runs one objective on one batch. A non-finite loss or gradient skips the update; an update that leaves
non-finite weights is not taken into the EMA; either is a bad update, counted (`train/skipped_nonfinite`). Steps
with a bad update are counted in a row (`train/nonfinite_in_a_row`; the driver stops at `train.max_nonfinite_steps`);
gradients are clipped. Weights leave the learner only through `sync_state` (trainable tensors only: the
frozen base never travels).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Mapping

import torch

from dualrl.algo.ema import EMA
from dualrl.algo.losses import mask_iou
from dualrl.algo.registry import build_objective, objective_class
from dualrl.algo.rollout_data import micro_batches
from dualrl.checkpoint import rng_state, set_rng_state
from dualrl.model.build import build_model
from dualrl.model.train_compile import CompiledBlocks
from dualrl.recipe import AlgoSpec, ModelSpec, OptimSpec, TrainSpec
from dualrl.workers import data_parallel as dp

log = logging.getLogger(__name__)


def _schedule(optim_spec: OptimSpec, total_steps: int):
    warmup = int(optim_spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim_spec.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Learner:
    def __init__(self, model: ModelSpec, algo: AlgoSpec, optim: OptimSpec, train: TrainSpec, device: str):
        self.optim_spec = optim
        self.device = device
        self.seed = train.seed
        self.rank = dp.Rank()  # one learner; `join_group` makes it one rank of several
        # The learner's process owns the randomness of training (LoRA init and dropout): seeded here, and
        # saved with its checkpoints, so a run is the same in-process or in a Ray actor, and on resume.
        torch.manual_seed(train.seed)
        random.seed(train.seed)
        self.model = build_model(model, device)
        self.model.train()
        # model.train_compile: the repeated blocks run compiled in updates (forward and backward), eager elsewhere
        self.compiled = CompiledBlocks(self.model) if model.train_compile else None
        self.objective = build_objective(algo, self.model, self._reference(model, algo, device))
        self.step_module: torch.nn.Module = dp.ObjectiveStep(self.model, self.objective)
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = optim
        self.optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=device.startswith("cuda")
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(o, train.steps))
        self.ema = EMA(self.model.trainable_state(), algo.ema_decay)
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.bad_updates: list[str] = []  # what went wrong in the bad updates of those steps

    def join_group(self, address: str, rank: int, world: int, backend: str, timeout_s: float) -> None:
        """Become rank `rank` of `world` data-parallel learners (rendezvous at rank 0's `address`): later updates
        take this rank's share of each step's regions and average gradients with the others."""
        self.rank = dp.Rank(rank, world)
        dp.join(address, self.rank, backend, timeout_s, self.seed)
        self.step_module = dp.data_parallel(self.step_module)

    def rng(self) -> dict:
        """This process's random state (dropout), saved per rank with a checkpoint."""
        return rng_state()

    def set_rng(self, state: dict | None) -> None:
        """A rank's saved random state; None (a rank the checkpoint did not have): a new stream of its own."""
        if state is not None:
            set_rng_state(state)
            return
        fresh = self.seed + dp.RANK_SEED * self.rank.index + dp.PART_SEED * self.scheduler.last_epoch
        torch.manual_seed(fresh)
        random.seed(fresh)

    @staticmethod
    def _reference(model: ModelSpec, algo: AlgoSpec, device: str):
        """A frozen copy of the starting model, only for GRPO's KL term (beta > 0)."""
        if not objective_class(algo).needs_reference(algo):
            return None
        reference = build_model(model, device).eval()
        reference.requires_grad_(False)
        return reference

    def step(self, batch: dict, rollout, generator: torch.Generator) -> dict[str, float]:
        """One driver step: `objective.iterations` updates on this batch (1 except GRPO's num_iterations),
        then one scheduler step. Metrics are the mean over the updates."""
        self.model.train()
        parts = micro_batches(batch, rollout, self.optim_spec.accumulation * self.rank.world)
        sums: dict[str, float] = {}
        skipped = self.skipped_steps
        for _ in range(self.objective.iterations):
            for k, v in self._update(parts, generator).items():
                sums[k] = sums.get(k, 0.0) + v
        if self.skipped_steps == skipped:
            self.bad_steps_in_a_row = 0
            self.bad_updates.clear()
        else:
            self.bad_steps_in_a_row += 1
        self.scheduler.step()
        metrics = {k: v / self.objective.iterations for k, v in sums.items()}
        metrics.update(
            {
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/skipped_nonfinite": float(self.skipped_steps),
                "train/nonfinite_in_a_row": float(self.bad_steps_in_a_row),
            }
        )
        return metrics

    def _update(self, parts: list[tuple[dict, object]], generator: torch.Generator) -> dict[str, float]:
        """One optimizer step over the micro-batches of a step (this rank's share of them): the loss is their
        mean, so the gradient is the mean of theirs (DDP averages the ranks'); metrics are averaged too."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, sums, counts = 0.0, {}, {}
        mine = dp.rank_parts(parts, self.rank)
        for k in mine:
            batch, rollout = parts[k]
            with self._no_sync(k == mine[-1]), self._compiled_blocks():
                with self.model.autocast(), _attention_without_plans():
                    out = self.step_module(batch, rollout, dp.part_generator(generator, k))
                (out.loss / len(mine)).backward()
            loss = loss + out.loss.detach().float()
            for name, v in out.metrics.items():  # a figure is the mean over the micro-batches that report it
                sums[name] = sums.get(name, 0.0) + v
                counts[name] = counts.get(name, 0) + 1
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.optim_spec.grad_clip)
        # Every figure the update reports reaches the host in one transfer: each `.item()` on the way would make
        # the host wait for the device mid-step.
        names = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
        figures = torch.stack(
            [loss, grad_norm.float().to(loss.device), *(sums[k].detach().float().to(loss.device) for k in names)]
        ).tolist()
        sums.update(zip(names, figures[2:]))
        sums["train/loss"], counts["train/loss"] = figures[0], len(mine)
        metrics = dp.mean_over_ranks(sums, counts, self.rank)
        loss, grad = metrics["train/loss"], figures[1]  # the gradient norm is the same on every rank
        step = self.scheduler.last_epoch + 1  # the driver's step this update belongs to
        if not (math.isfinite(loss) and math.isfinite(grad)):
            self._bad_update(f"step {step}: loss={loss}, grad_norm={grad}, update skipped")
            return {**metrics, "train/loss": loss, "train/grad_norm": grad}
        self.optimizer.step()
        # A finite update can still blow the weights up (a huge learning rate): checked before the EMA takes them.
        state = self.model.trainable_state()
        broken = nonfinite_tensors(state)
        if broken:
            self._bad_update(
                f"step {step}: the update (loss={loss:.4g}, grad_norm={grad:.4g}) left non-finite weights in "
                f"{_names(broken)}, EMA not updated"
            )
        else:
            self.ema.update(state)
        return {**metrics, "train/loss": loss, "train/grad_norm": grad}

    def _compiled_blocks(self):
        return self.compiled.active() if self.compiled is not None else contextlib.nullcontext()

    def _no_sync(self, last: bool):
        """DDP averages gradients once, in the backward of a rank's last micro-batch."""
        if last or self.rank.world == 1:
            return contextlib.nullcontext()
        return self.step_module.no_sync()

    def _bad_update(self, what: str) -> None:
        self.skipped_steps += 1
        self.bad_updates.append(what)
        log.warning("%s (%d skipped or non-finite so far)", what, self.skipped_steps)

    def nonfinite_report(self) -> list[str]:
        """What went wrong in the bad updates of the current run of bad steps (empty after a good step)."""
        return list(self.bad_updates)

    def nonfinite_weights(self) -> list[str]:
        """Names of the trainable tensors (`model.`) and EMA tensors (`ema.`) that are not finite; checked before
        each checkpoint, so that none is written from broken weights."""
        model = [f"model.{n}" for n in nonfinite_tensors(self.model.trainable_state())]
        return model + [f"ema.{n}" for n in nonfinite_tensors(self.ema.tensors())]

    # ----------------------------------------------------------------------------- weights out
    def sync_state(self, which: str) -> dict[str, torch.Tensor]:
        """Trainable tensors to send to a worker: the student's ("policy") or the EMA's ("ema")."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.sync_tensors(which).items()}

    def sync_tensors(self, which: str) -> dict[str, torch.Tensor]:
        """The student's ("policy") or the EMA's ("ema") trainable tensors where they live (no copy)."""
        return self.ema.tensors() if which == "ema" else self.model.trainable_state()

    def sync_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.ema.tensors().values())

    # ----------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def describe(self, batch: dict):
        self.model.eval()
        with self.model.autocast():
            return self.model.describe(batch["images"], batch["masks"])

    @torch.no_grad()
    def refer(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment each region from its expression; returns (IoU per region, low-res logits)."""
        self.model.eval()
        with self.model.autocast():
            logits, *_ = self.model.segment(batch["images"], list(batch["expression"]))
        logits = logits.float()
        return mask_iou(logits, batch["masks"].to(logits.device)).cpu(), logits.cpu()

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "model": self.model.trainable_state(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_trainable(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state["skipped_steps"])
        set_rng_state(state["rng"])


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors whose L2 norm is not finite: a NaN or inf in them, or values so large that the norm
    overflows (about 1e19 in float32), blown-up weights either way. One fused norm per tensor and one transfer
    to the host when all are finite."""
    if not tensors:
        return []
    norms = torch._foreach_norm(list(tensors.values()))
    device = norms[0].device
    finite = torch.isfinite(torch.stack([n.to(device) for n in norms]))
    if finite.all().item():
        return []
    return [name for name, ok in zip(tensors, finite.tolist()) if not ok]


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _attention_without_plans():
    """sdpa backends in an order that prefers kernels without per-shape set-up: cuDNN's attention builds a plan for
    every new sequence length (~100 ms for forward and backward on an H200, benchmarks/gpu/sdpa_shapes.py), and
    training batches bring new lengths at almost every step; the memory-efficient kernel runs as fast once both
    are warm. All backends stay allowed, only the order changes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
