"""The sections that say how a run goes: `optim`, `train`, `eval`, `runtime`, `wandb`, and the `rewards` entries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from dualrl.recipe.section import MAX_BATCH, MAX_STEPS, Section


class OptimSpec(Section):
    """AdamW over the trainable parameters, with a warmup then cosine (or constant) learning rate."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate, reached after the warmup (Sa2VA: 1e-5).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW's decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2).")
    grad_clip: float = Field(1.0, gt=0, description="Gradients are clipped to this global L2 norm.")
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="Share of train.steps over which the learning rate rises linearly from 0."
    )
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After the warmup: cosine decay to 0 at train.steps, or a constant rate."
    )
    accumulation: int = Field(
        1,
        ge=1,
        description="Split each step's batch into this many micro-batches: one forward/backward each, one optimizer "
        "step (Sa2VA: 2 regions x 4 per GPU).",
    )
    fused: bool | None = Field(
        None,
        description="AdamW's fused kernel; null: on a GPU only. With it (and weights not sharded), an update decides "
        "on the device whether it was bad (skipped, EMA gated) and its figures are read only on the steps that "
        "log, evaluate or save, so the learner never waits for the device in between.",
    )


class TrainSpec(Section):
    """The training loop: length, logging, checkpoints, device and the run's seed."""

    steps: int = Field(
        200, gt=0, le=MAX_STEPS, description="Optimizer steps of the run; the learning-rate schedule spans them."
    )
    log_every: int = Field(10, gt=0, description="Steps between lines of metrics.jsonl (and wandb).")
    save_every: int = Field(100, gt=0, description="Steps between checkpoints (one is also saved at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in output_dir/checkpoints/.")
    sync_every: int = Field(
        1,
        gt=0,
        description="Steps between weight syncs to the rollout/reward workers (an algorithm without captions, "
        "pretrain, syncs before each evaluation instead).",
    )
    max_nonfinite_steps: int = Field(
        3,
        gt=0,
        description="Steps in a row whose update was skipped for a non-finite loss or gradient, or left non-finite "
        "weights, after which the run stops with an error (exit 1, no checkpoint from such weights); a single one is "
        "skipped, counted in train/skipped_nonfinite, and the run goes on. With optim.fused (a GPU's default) the "
        "count is read on the steps that log, evaluate or save, so the run stops at the first of those after it.",
    )
    seed: int = Field(
        0,
        description="The run's seed: the learner's torch and Python RNGs (LoRA init, dropout) and each step's "
        "generators (caption sampling, Gumbel noise, point sampling). model.seed and data.seed follow it unless set "
        "on their own; data.shapes.seed does not (it fixes the held-out scenes).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs: auto takes cuda when a GPU is visible, else cpu."
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads of the run's processes (null: 1 where the model runs on a GPU, as "
        "torchrun sets them for several processes a node, so that idle pool threads leave the cores to the loader "
        "workers; on a CPU, torch's default in the driver's process and every core in Ray actors).",
    )
    stop_at_step: int | None = Field(
        None,
        gt=0,
        description="Stop early at this step as if interrupted (for resume tests); the schedule still spans `steps`.",
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop at the first step boundary after this much wall time, save a checkpoint and exit as if "
        "interrupted (for job time limits); the same command resumes, and the schedule still spans `steps`.",
    )


class EvalSpec(Section):
    """Evaluation on held-out regions during training (eval/* metrics)."""

    every: int = Field(100, gt=0, description="Steps between evaluations (one is also run at the last step).")
    at_start: bool = Field(True, description="Evaluate before the first step, to have the starting point.")
    batch_size: int = Field(
        32, gt=0, le=MAX_BATCH, description="Regions per evaluation batch (memory only; not data.batch_size)."
    )
    split: Literal["val", "select"] = Field(
        "val",
        description="Held-out regions the run evaluates on: `val`, or `select` (shapes only: a disjoint split "
        "for choosing settings, so that `val` figures stay unbiased).",
    )


class RuntimeSpec(Section):
    """Where the learner, rollout and reward workers live."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: all workers in this process; ray: each worker a Ray actor."
    )
    address: str | None = Field(None, description="Ray address to join; null starts a local instance.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a locally started Ray.")
    worker_cpus: float = Field(0.0, ge=0, description="num_cpus of each actor (0 lets 3 actors share 2 cores).")
    worker_gpus: float = Field(0.0, ge=0, description="num_gpus of each actor (fractions share a GPU).")
    learner_gpus: float | None = Field(
        None,
        ge=0,
        description="num_gpus of each learner actor; null takes worker_gpus (e.g. 1 here and 0.5 for the "
        "workers puts the learner on a card and the rollout and reward workers together on another).",
    )
    rollout_gpus: float | None = Field(
        None, ge=0, description="num_gpus of each rollout actor; null takes worker_gpus."
    )
    reward_gpus: float | None = Field(None, ge=0, description="num_gpus of each reward actor; null takes worker_gpus.")
    learners: int = Field(
        1,
        ge=1,
        le=1024,
        description="ray: learner actors forming one torch.distributed group (NCCL when each has a GPU of its own, "
        "gloo otherwise); each "
        "takes an equal share of a step's regions and DDP averages the trainable gradients, so the update is the one "
        "learner's with optim.accumulation x learners micro-batches. data.batch_size must be at least "
        "learners x optim.accumulation.",
    )
    learner_sharding: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ray, learners > 1: how the learners hold the model. ddp: each holds all of it and the trainable "
        "gradients are averaged; fsdp: FSDP2 (fully_shard) over the learners, each holding 1/learners of every "
        "repeated block's and of the other parameters, gradients and AdamW states (for fully trainable models and "
        "models larger than one card); evaluation, weight sync and checkpoints gather the weights, every rank taking "
        "part. The same update either way; checkpoints are alike and resume under either.",
    )
    rollout_workers: int = Field(
        1, ge=1, le=1024, description="ray: rollout actors; a step's regions are split among them."
    )
    reward_workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="ray: reward actors (EMA segmenter + plugins); a step's regions are split among them.",
    )
    weight_sync: Literal["auto", "object_store", "collective", "cuda_ipc"] = Field(
        "auto",
        description="ray: how trainable weights reach the rollout and reward workers. collective: broadcast from "
        "learner rank 0 over a process group of its own (NCCL when learner 0 and the group's workers each hold a "
        "card of their own: card to card; gloo otherwise); cuda_ipc: workers on learner 0's card map its weight "
        "buffers through CUDA IPC and copy them on the card; object_store: one copy put in Ray's object store, "
        "read by each worker; auto: collective when learner 0 and the workers each hold a card of their own "
        "(NCCL), cuda_ipc when every actor (learners too) shares one card, object_store otherwise (CPUs; "
        "workers sharing cards).",
    )
    async_rollout: bool = Field(
        False,
        description="ray: make step t+1's captions and rewards while the learner trains on step t (one step "
        "off-policy: they come from the weights of the sync before). grpo's ratio then uses the sampler's log-probs; "
        "sft_dual learns from the EMA captions of the sync before. async/staleness is logged. Off: every step's "
        "rollout comes from the weights just synced.",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="ray, learners > 1: seconds a collective (gradient all-reduce, weight broadcast) may wait for "
        "the other ranks before it fails naming the group; bounds a stalled or dead rank.",
    )
    call_timeout_s: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="ray: seconds each call into an actor may take (a rollout, a reward batch, a learner step, an "
        "eval batch, a weight sync, a checkpoint's state); past it the run stops with an error naming the actor and "
        "kills the actors. Real-scale calls take seconds (Sa2VA-8B on one H200: rollout 4.2 s, learner step 3.9 s); "
        "10 min leaves room for eval batches, checkpoint states and the LLM judge's 45 s deadline per batch, yet ends "
        "a frozen run within the hour.",
    )
    start_timeout_s: float = Field(
        1800.0,
        gt=0,
        allow_inf_nan=False,
        description="ray: seconds an actor may take to start (placement on a node with the resources asked for, "
        "imports, model build, pretrained weights read from shared storage) and to answer the first call of each "
        "of its methods (which may compile or allocate); longer than runtime.call_timeout_s because an autoscaled "
        "GPU node can take many minutes to join.",
    )

    def gpus(self, role: str) -> float:
        """num_gpus of each actor of `role` ("learner", "rollout worker" or "reward worker")."""
        own = {"learner": self.learner_gpus, "rollout worker": self.rollout_gpus, "reward worker": self.reward_gpus}
        return self.worker_gpus if own[role] is None else own[role]

    def all_gpus(self) -> float:
        """The GPUs every actor of the run asks for together."""
        counts = {
            "learner": self.learners,
            "rollout worker": self.rollout_workers,
            "reward worker": self.reward_workers,
        }
        return round(sum(n * self.gpus(role) for role, n in counts.items()), 4)  # 0.1 + 0.2 is 0.3 here


class WandbSpec(Section):
    """Weights & Biases logging (the same metrics as metrics.jsonl, plus tables)."""

    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline writes under output_dir for a later `wandb sync`; online uploads; disabled."
    )
    project: str = Field("dualrl", description="wandb project name.")
    name: str | None = Field(None, description="wandb run name (null: wandb picks one).")
    table_rows: int = Field(8, ge=0, description="Regions shown in the eval overlay table.")


class RewardSpec(Section):
    """One reward plugin: a built-in `name`, a `module:attr`, or `path` (a .py file) + `name` (a function or
    class in it). Keys other than the ones below are the plugin's own options."""

    model_config = ConfigDict(extra="allow")  # the plugin's options; the rest of Section's checks apply

    name: str = Field(
        min_length=1,
        description="A built-in reward (mask_iou, meteor, llm_judge, length, repetition), a `module:attr`, or the "
        "name of a function or class in `path`. Its last part names the metric: reward/<name>.",
    )
    path: str | None = Field(None, description="A .py file that holds `name` (null: `name` is built in or importable).")
    weight: float = Field(
        1.0, ge=0, description="Weight of this reward in reward/total (0: logged, not trained on; not all of them 0)."
    )
    timeout_s: float = Field(60.0, gt=0, description="A call that takes longer is a failure of that step.")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def key(self) -> str:
        """The name metrics are logged under (`reward/<key>`)."""
        return self.name.rpartition(":")[2]
