"""The whole recipe: its top-level sections, the keys derived from others, and the checks across sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from dualrl.recipe.algo import AlgoSpec
from dualrl.recipe.data import DataSpec
from dualrl.recipe.model import ModelSpec
from dualrl.recipe.run import EvalSpec, OptimSpec, RewardSpec, RuntimeSpec, TrainSpec, WandbSpec
from dualrl.recipe.section import Section

# Keys whose null means "the same as another key". They are filled in here, when the recipe is validated, and
# nowhere else; the resolved value is what a run reads and what its recipe.yaml records.
DERIVED: dict[str, str] = {
    "model.seed": "train.seed",
    "data.seed": "train.seed",
    "algo.grpo.max_completion_length": "model.max_caption_tokens",
}


def get_dotted(node: Any, key: str) -> Any:
    """The value at a dotted key of a validated recipe (`model.sam.image_size`)."""
    for part in key.split("."):
        node = getattr(node, part)
    return node


class Recipe(Section):
    """A training run: the model, its data, the objective, and how the run goes."""

    output_dir: str = Field(
        description="Where the run writes metrics.jsonl, summary.json, checkpoints/ and recipe.yaml (the resolved "
        "recipe); a run started again with the same output_dir resumes from its latest checkpoint. Not empty (`.` "
        "is the current folder); the launcher checks that it is a folder it can write before writing anything."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The GroundedVLM: architecture, weights, decoding.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training and held-out data.")
    algo: AlgoSpec = Field(default_factory=AlgoSpec, description="The objective and its losses.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and learning-rate schedule.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="The training loop.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Held-out evaluation during training.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Where the workers run.")
    wandb: WandbSpec = Field(default_factory=WandbSpec, description="Weights & Biases logging.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="mask_iou")],
        description="Reward plugins and their weights; their weighted sum drives grpo and is logged as reward/total "
        "by every algorithm.",
    )

    @field_validator("output_dir")
    @classmethod
    def _named_folder(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the run's folder (`.` for the current one)")
        return value

    @model_validator(mode="after")
    def _derive(self) -> Recipe:
        for key, source in DERIVED.items():
            section, _, name = key.rpartition(".")
            if getattr(get_dotted(self, section), name) is None:
                value = get_dotted(self, source)
                try:
                    setattr(get_dotted(self, section), name, value)
                except ValidationError as err:
                    reason = err.errors()[0]["msg"]
                    raise ValueError(f"{key} follows {source}={value!r}: {reason}; set {key} on its own") from None
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.data.shapes is not None and self.data.shapes.min_objects > self.data.shapes.max_objects:
            raise ValueError("data.shapes.min_objects must not exceed data.shapes.max_objects")
        keys = [r.key for r in self.rewards]
        if len(set(keys)) != len(keys):
            raise ValueError(f"rewards: two plugins log under the same name ({keys})")
        if self.rewards and not any(r.weight for r in self.rewards):
            raise ValueError(
                f"rewards: every weight is 0; algo.name={self.algo.name} needs at least one reward with a non-zero "
                "weight in `rewards` (reward/total is their weighted sum)"
            )
        if self.algo.name == "grpo" and not self.rewards:
            raise ValueError("algo.name=grpo needs at least one reward with a non-zero weight in `rewards`")
        if not self.data.training_sources():
            raise ValueError(
                f"data: no training source is on; configure one of data.{', data.'.join(DataSpec.source_names())} "
                "with a weight > 0"
            )
        held_out = self.data.held_out_source()
        if held_out == "refcoco" and self.data.refcoco is None:
            raise ValueError("data.eval_source=refcoco but data.refcoco is off; set data.refcoco.* or eval_source=auto")
        if self.eval.split != "val" and held_out != "shapes":
            raise ValueError(f"eval.split={self.eval.split} exists for the shapes source only; set eval.split=val")
        self._check_workers()
        return self

    def _check_workers(self) -> None:
        r = self.runtime
        if r.kind == "local" and r.async_rollout:
            raise ValueError(
                "runtime.async_rollout needs runtime.kind=ray (in one process the rollout would share the learner's "
                "model while it trains)"
            )
        if r.kind == "local" and max(r.learners, r.rollout_workers, r.reward_workers) > 1:
            raise ValueError(
                "runtime.learners/rollout_workers/reward_workers above 1 need runtime.kind=ray (the local runtime "
                "runs one of each in this process)"
            )
        if r.learner_sharding == "fsdp" and self.model.train_compile:
            raise ValueError(
                "runtime.learner_sharding=fsdp with model.train_compile: the compiled blocks would have to trace "
                "FSDP's gathers, which dualrl does not do;"
                " set model.train_compile=false or runtime.learner_sharding=ddp"
            )
        if r.learner_sharding == "fsdp" and self.model.train_fuse_projections:
            raise ValueError(
                "runtime.learner_sharding=fsdp with model.train_fuse_projections: the fused copies would be of "
                "sharded base weights; set model.train_fuse_projections=false or runtime.learner_sharding=ddp"
            )
        if r.learner_sharding == "fsdp" and self.algo.sft_dual.dual_segmenter == "frozen":
            raise ValueError(
                "runtime.learner_sharding=fsdp with algo.sft_dual.dual_segmenter=frozen: holding sharded weights "
                "constant for one pass is not something dualrl does; use runtime.learner_sharding=ddp"
            )
        if r.learners > 1 and self.model.train_graphs:
            raise ValueError(
                f"runtime.learners={r.learners} with model.train_graphs: the graphs serve one learner (under FSDP they "
                "would capture its gathers, under DDP they are untested); set model.train_graphs=false or "
                "runtime.learners=1"
            )
        if r.learner_sharding == "fsdp" and 0 < r.gpus("learner") < 1:
            raise ValueError(
                f"runtime.learner_sharding=fsdp with learners asking {r.gpus('learner')} GPU (runtime.learner_gpus, "
                "else runtime.worker_gpus): learners sharing a card talk over gloo with GPU tensors, which dualrl's "
                "sharding does not support (it runs over NCCL, a whole GPU per learner, or gloo on CPUs); give each "
                "learner a GPU (runtime.learner_gpus=1) or set runtime.learner_sharding=ddp"
            )
        shares = r.learners * self.optim.accumulation
        if r.learners > 1 and self.data.batch_size < shares:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is smaller than runtime.learners x optim.accumulation="
                f"{shares}: every learner micro-batch needs at least one region"
            )
        workers = max(r.rollout_workers, r.reward_workers)
        if self.data.batch_size < workers:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is smaller than the {workers} rollout/reward workers: each "
                "needs at least one region"
            )
