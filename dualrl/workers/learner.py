"""Learner: owns the student model, its optimizer and schedule, and the EMA of its trainable weights.

`step` runs one objective on one batch. A non-finite loss or gradient skips the update; an update that leaves
non-finite weights is not taken into the EMA; either is a bad update, counted (`train/skipped_nonfinite`). Steps
with a bad update are counted in a row (`train/nonfinite_in_a_row`; the driver stops at `train.max_nonfinite_steps`);
gradients are clipped. Weights leave the learner only through `sync_state` (trainable tensors only: the
frozen base never travels).

With a fused optimizer (`optim.fused`, a GPU's default) and weights not sharded, these checks run on the device:
the optimizer skips a bad update on a device flag and the EMA is gated by another (`EMA.update_unless`), so an
update never waits for the GPU. Its figures wait in the ledger (`dualrl/workers/ledger.py`) until a step asks for
them (`read=True`: the driver asks on the steps it logs, evaluates or saves), and are then counted in order as if
read at once. Elsewhere every step reads them.
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
from dualrl.model.train_graphs import TrainGraphs
from dualrl.model.train_projections import TrainProjections
from dualrl.recipe import AlgoSpec, ModelSpec, OptimSpec, TrainSpec
from dualrl.workers import data_parallel as dp
from dualrl.workers import sharding
from dualrl.workers.ledger import Ledger

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
        self.compiled = CompiledBlocks(self.model, model.train_compile_wrapper) if model.train_compile else None
        # model.train_fuse_projections: sibling LoRA projections computed together in updates
        self.projections = TrainProjections(self.model.lm) if model.train_fuse_projections else None
        # model.train_graphs: the encoders, SAM2 decoding and LLM replay CUDA graphs in updates (CUDA only)
        self.graphs = TrainGraphs(self.model) if model.train_graphs and device.startswith("cuda") else None
        self.objective = build_objective(algo, self.model, self._reference(model, algo, device))
        self.step_module: torch.nn.Module = dp.ModelCall(self.model)
        self.shards: sharding.Shards | None = None  # runtime.learner_sharding=fsdp: this rank's part of the weights
        self.total_steps = train.steps
        self._optimizer()
        self.ema = EMA(self.model.trainable_state(), algo.ema_decay)
        self.ledger = Ledger(list(self.trainable))
        self._longest_reports: list[str] = []  # nonfinite_report's answer, set by each read

    def _optimizer(self) -> None:
        """AdamW over the trainable parameters (as they are now: whole, or this rank's shards) and its schedule."""
        o = self.optim_spec
        # the trainable parameters by name, kept: walking the model's modules for them costs milliseconds a step
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        params = list(self.trainable.values())
        fused = self.device.startswith("cuda") if o.fused is None else o.fused
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(o, self.total_steps))

    @property
    def checks_on_device(self) -> bool:
        """Whether an update decides on the device whether it was bad (see the module's docstring): the fused
        optimizer skips on a device flag; sharded weights are checked over every rank's shards on the host."""
        return all(g.get("fused") for g in self.optimizer.param_groups) and self.shards is None

    @property
    def skipped_steps(self) -> int:
        self.ledger.settle()
        return self.ledger.skipped

    def join_group(
        self, address: str, rank: int, world: int, backend: str, timeout_s: float, how: str = "ddp"
    ) -> float:
        """Become rank `rank` of `world` data-parallel learners (rendezvous at rank 0's `address`): later updates
        take this rank's share of each step's regions and average gradients with the others (`how`: ddp), or
        the ranks shard the model among them (fsdp; before any update, so optimizer and EMA are made again over
        this rank's shards, from the same values). Returns the fraction of the trainable weights this rank holds."""
        self.rank = dp.Rank(rank, world)
        dp.join(address, self.rank, backend, timeout_s, self.seed)
        if how == "fsdp":
            self.step_module = sharding.shard(self.step_module, self.model, self.model.device)
            self.shards = sharding.Shards(self.model)
            reference = getattr(self.objective, "reference", None)
            if reference is not None:  # GRPO's frozen reference: 1/N of it on each rank too
                self.objective.reference_call = sharding.sharded_call(reference, reference.device)
            self._optimizer()
            self.ema = EMA(self.shards.local(self.model.trainable_state()), self.ema.decay)
            return self.shards.held() / self.shards.nbytes(self.ema.tensors())
        self.step_module = dp.data_parallel(self.step_module)
        return 1.0

    def follow(self, name: str, *args) -> None:
        """Take part in a call that rank 0 answers for the group when the learners shard the weights (gathering
        them is a collective): run method `name` here. Only rank 0's answer travels: a follower returns nothing,
        and the gathers send the whole tensors to rank 0 alone (a follower's `sync_state` and `state_dict` hold
        no whole copies)."""
        getattr(self, name)(*args)

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

    def step(self, batch: dict, rollout, generator: torch.Generator, read: bool = True) -> dict[str, float]:
        """One driver step: `objective.iterations` updates on this batch (1 except GRPO's num_iterations),
        then one scheduler step. Metrics are the mean over the updates. With `read=False`, where the checks run on
        the device, the step returns without waiting for the GPU, and its metrics hold only the learning rate (and
        the graphs' count): the figures wait for the next step that reads."""
        if not self.model.training:  # set all the way down only after an eval(): a walk of every module
            self.model.train()
        parts = micro_batches(batch, rollout, self.optim_spec.accumulation * self.rank.world)
        step = self.scheduler.last_epoch + 1  # the driver's step these updates belong to
        for _ in range(self.objective.iterations):
            self._update(parts, generator, step)
        self.scheduler.step()
        metrics = {"train/lr": self.scheduler.get_last_lr()[0]}
        if read or not self.checks_on_device:
            metrics.update(self._read())
        if self.graphs is not None:  # parts that ran eagerly because the graphs' cap was reached (0 when all replay)
            metrics["train/graph_eager_calls"] = float(self.graphs.eager_calls)
        return metrics

    def _read(self) -> dict[str, float]:
        """The ledger settled: the last step's figures (the mean over its updates; each update's over the ranks'
        micro-batches), the counts of bad updates and of bad steps in a row."""
        updates = self.ledger.settle()
        sums: dict[str, float] = {}
        for u in updates:
            figures = dp.mean_over_ranks(u.figures, u.counts, self.rank)
            figures["train/grad_norm"] = u.grad_norm  # the same on every rank
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + v
        metrics = {k: v / len(updates) for k, v in sums.items()}
        metrics["train/skipped_nonfinite"] = float(self.ledger.skipped)
        metrics["train/nonfinite_in_a_row"] = float(self.ledger.in_a_row)
        # the longest run since the last read: with reads every few steps, a run can end between two reads
        metrics["train/nonfinite_longest_run"] = float(self.ledger.longest)
        self._longest_reports = self.ledger.longest_reports
        self.ledger.new_window()
        return metrics

    def _update(self, parts: list[tuple[dict, object]], generator: torch.Generator, step: int) -> None:
        """One optimizer step over the micro-batches of a step (this rank's share of them): the loss is their
        mean, so the gradient is the mean of theirs (DDP averages the ranks'); its figures go to the ledger."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, sums, counts = 0.0, {}, {}
        mine = dp.rank_parts(parts, self.rank)
        for k in mine:
            batch, rollout = parts[k]
            with self._no_sync(k == mine[-1]), self._compiled_blocks(), self._graphs(), self._projections():
                with self.model.autocast(), _attention_without_plans():
                    out = self.step_module(self.objective, batch, rollout, dp.part_generator(generator, k))
                (out.loss / len(mine)).backward()
            loss = loss + out.loss.detach().float()
            for name, v in out.metrics.items():  # a figure is the mean over the micro-batches that report it
                sums[name] = sums.get(name, 0.0) + v
                counts[name] = counts.get(name, 0) + 1
        sums["train/loss"], counts["train/loss"] = loss, len(mine)
        params = list(self.trainable.values())
        grad_norm = sharding.whole_tensor(torch.nn.utils.clip_grad_norm_(params, self.optim_spec.grad_clip))
        # bad: the loss or the gradient is not finite, on any rank (the gradient norm is the same on every rank)
        bad = dp.any_rank(~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))), self.rank)
        state = self.trainable if self.shards is None else self.shards.local(self.trainable)
        if self.checks_on_device:
            self.optimizer.found_inf = bad.float()  # the fused optimizer skips the update where it is 1
            self.optimizer.step()
            # A finite update can still blow the weights up (a huge learning rate): checked before the EMA takes them.
            finite = self.ema.update_unless(state, bad)
        else:
            finite = torch.ones(len(state), dtype=torch.bool)
            if not bad.item():
                self.optimizer.step()
                broken = set(self._nonfinite(state))
                finite = torch.tensor([n not in broken for n in state])
                if not broken:
                    self.ema.update(state)
        self.ledger.add(step, loss / len(mine), grad_norm, bad, finite, sums, counts)

    def _compiled_blocks(self):
        return self.compiled.active() if self.compiled is not None else contextlib.nullcontext()

    def _projections(self):
        return self.projections.active() if self.projections is not None else contextlib.nullcontext()

    def _graphs(self):
        return self.graphs.active() if self.graphs is not None else contextlib.nullcontext()

    def _no_sync(self, last: bool):
        """DDP averages gradients once, in the backward of a rank's last micro-batch; FSDP reduces them then too."""
        if self.shards is not None:
            self.step_module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or self.rank.world == 1:
            return contextlib.nullcontext()
        return self.step_module.no_sync()

    def _nonfinite(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """`nonfinite_tensors`; with sharded weights over every rank's shards (a collective)."""
        broken = nonfinite_tensors(tensors)
        if self.shards is None:
            return broken
        return self.shards.any_rank(list(tensors), broken, self.model.device)

    def _whole(self, fn, *args):
        """`fn(model, *args)`, with sharded weights inside the root's call with every block gathered (every rank
        makes the same call), and the root's parameters sharded again after it."""
        if self.shards is None:
            return fn(self.model, *args)
        try:
            return self.step_module(sharding.gathered(fn), *args)
        finally:
            self.step_module.reshard()

    def nonfinite_report(self) -> list[str]:
        """What went wrong in the bad updates of the longest run of bad steps up to the last read (that stops the
        run; on a CPU, with a read every step, the current run: empty after a good step)."""
        return list(self._longest_reports)

    def nonfinite_weights(self) -> list[str]:
        """Names of the trainable tensors (`model.`) and EMA tensors (`ema.`) that are not finite; checked before
        each checkpoint, so that none is written from broken weights."""
        model = self.model.trainable_state()
        if self.shards is not None:
            model = self.shards.local(model)
        ema = self._nonfinite(self.ema.tensors())
        return [f"model.{n}" for n in self._nonfinite(model)] + [f"ema.{n}" for n in ema]

    # ----------------------------------------------------------------------------- weights out
    def sync_state(self, which: str) -> dict[str, torch.Tensor]:
        """Trainable tensors to send to a worker: the student's ("policy") or the EMA's ("ema")."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.sync_tensors(which).items()}

    def sync_tensors(self, which: str) -> dict[str, torch.Tensor]:
        """The student's ("policy") or the EMA's ("ema") trainable tensors where they live (no copy); whole ones
        gathered from every rank's shards to rank 0 when the learners shard them (every rank calls this; the
        others get {})."""
        tensors = self.ema.tensors() if which == "ema" else self.model.trainable_state()
        return tensors if self.shards is None else self.shards.whole(tensors, first_only=True)

    def sync_bytes(self) -> int:
        ema = self.ema.tensors()
        if self.shards is not None:
            return self.shards.nbytes(ema)
        return sum(t.numel() * t.element_size() for t in ema.values())

    # ----------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def describe(self, batch: dict):
        self.model.eval()
        with self.model.autocast():
            return self._whole(lambda model: model.describe(batch["images"], batch["masks"]))

    @torch.no_grad()
    def refer(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment each region from its expression; returns (IoU per region, low-res logits)."""
        self.model.eval()
        with self.model.autocast():
            logits, *_ = self._whole(lambda model: model.segment(batch["images"], list(batch["expression"])))
        logits = logits.float()
        return mask_iou(logits, batch["masks"].to(logits.device)).cpu(), logits.cpu()

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Weights, EMA and optimizer state as one learner has them: whole, gathered from every rank's shards to
        rank 0 when the learners shard them (every rank calls this then; only rank 0's answer is whole)."""
        if self.shards is not None:
            model = self.shards.whole(self.model.trainable_state(), first_only=True)
            ema = self.shards.whole(self.ema.state_dict(), first_only=True)
            optimizer = self.shards.whole_optimizer(self.optimizer.state_dict(), first_only=True)
        else:
            model, ema, optimizer = self.model.trainable_state(), self.ema.state_dict(), self.optimizer.state_dict()
        return {
            "model": model,
            "ema": ema,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint (whole tensors); each rank takes its shards when the learners shard the weights."""
        model, ema, optimizer = state["model"], state["ema"], state["optimizer"]
        if self.shards is not None:
            model, ema = self.shards.part(model), self.shards.part(ema)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer = self.shards.optimizer_part(optimizer, params)
        self.model.load_trainable(model)
        self.ema.load_state_dict(ema)
        # the kernel is this run's choice (optim.fused may change on resume, as from a CPU to a GPU): torch would
        # take the saved groups' flag with the state
        fused = self.optimizer.defaults.get("fused")
        groups = [{**g, "fused": fused} for g in optimizer["param_groups"]]
        self.optimizer.load_state_dict({**optimizer, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        self.ledger.settle()  # updates made before the load are not the checkpoint's
        self.ledger.skipped = int(state["skipped_steps"])
        set_rng_state(state["rng"])


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors whose L2 norm is not finite: a NaN or inf in them, or values so large that the norm
    overflows (about 1e19 in float32), blown-up weights either way. One fused norm per tensor and one transfer
    to the host when all are finite."""
    if not tensors:
        return []
    with torch.no_grad():
        norms = torch._foreach_norm(list(tensors.values()))
        device = norms[0].device
        if any(n.device != device for n in norms):
            norms = [n.to(device) for n in norms]
        finite = torch.isfinite(torch.stack(norms))
    if finite.all().item():
        return []
    return [name for name, ok in zip(tensors, finite.tolist()) if not ok]


def _attention_without_plans():
    """sdpa backends in an order that prefers kernels without per-shape set-up: cuDNN's attention builds a plan for
    every new sequence length (~100 ms for forward and backward on an H200, benchmarks/gpu/sdpa_shapes.py), and
    training batches bring new lengths at almost every step; the memory-efficient kernel runs as fast once both
    are warm. All backends stay allowed, only the order changes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
