"""Typed recipes: the YAML a run is described by, mirrored by pydantic models.

Every field carries its default and its help text here, in one place. `load_recipe` reads a YAML file,
applies `dotted.key=value` overrides (later ones win) and validates everything — unknown keys, wrong types,
values out of range, missing files — before any model is built, naming the key path in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------- model
class VisionSpec(Section):
    """InternViT-shaped vision tower (tiny sizes by default; real ones come with a pretrained directory)."""

    hidden_size: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    image_size: int = Field(128, gt=0, description="VLM input tile size in pixels (448 for InternVL).")
    patch_size: int = Field(8, gt=0, description="ViT patch size; token grid = (image/patch) * 0.5.")
    qkv_bias: bool = Field(False, description="Biases on the attention projections (InternViT-300M: true).")
    layer_norm_eps: float = Field(1e-6, gt=0)


class TextSpec(Section):
    """The language model: Qwen2-shaped (Sa2VA-1B/4B, InternVL3) or InternLM2-shaped (Sa2VA-8B)."""

    arch: Literal["qwen2", "internlm2"] = Field(
        "qwen2",
        description="qwen2: Qwen2/2.5 (biases on q, k, v). "
        "internlm2: InternLM2/2.5, run as transformers' Llama (no "
        "biases; Sa2VA's fused `wqkv` is split on load, fused on export).",
    )
    hidden_size: int = Field(128, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(512, gt=0)
    vocab_size: int = Field(512, gt=0, description="Size of the tiny offline BPE vocabulary.")
    tie_word_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (Qwen2.5: 1e6).")
    rms_norm_eps: float = Field(1e-6, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)


NANO_SAM_OVERRIDES = [
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    # From scratch, the stride-4/8 skip features let the decoder reach an "every object" mask without
    # reading its prompt, and it then never learns to (measured: identical IoU for true and random
    # clicks after 400 steps). Real SAM2 checkpoints keep the skip path.
    "++model.use_high_res_features_in_sam=false",
]


class SamSpec(Section):
    """SAM2 built by the official `sam2` package from one of its configs."""

    config: str = Field("configs/sam2.1/sam2.1_hiera_t.yaml", description="sam2 package config name.")
    image_size: int = Field(128, gt=0, description="Square SAM input size (1024 for real SAM2).")
    overrides: list[str] = Field(
        default_factory=lambda: list(NANO_SAM_OVERRIDES),
        description="Hydra overrides composed onto the config (tiny trunk).",
    )
    checkpoint: str | None = Field(None, description="Official SAM2 `.pt` to load (real use).")
    pe_gain: float = Field(
        1.0,
        gt=0,
        description="Gain on the prompt encoder's random-Fourier positional "
        "encodings. From scratch, 3 shortens the plateau before the mask decoder starts "
        "using its prompt; keep 1 for pretrained SAM2.",
    )


class TrainableSpec(Section):
    """What trains. Defaults are Sa2VA's set: LoRA on the LLM, mask decoder, projection, mlp1, new rows."""

    lora: bool = True
    lora_r: int = Field(128, gt=0)
    lora_alpha: int = Field(256, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    llm: bool = Field(False, description="Train the whole LLM (no LoRA); used by tiny pretraining.")
    vision: bool = False
    projector: bool = Field(True, description="InternVL's mlp1 (multi_modal_projector).")
    sam_encoder: bool = False
    sam_decoder: bool = True
    seg_projection: bool = Field(True, description="text_hidden_fcs: [SEG] hidden state -> SAM prompt.")
    new_token_rows: bool = Field(True, description="Embedding rows of the added special tokens.")

    @model_validator(mode="after")
    def _one_llm_mode(self) -> TrainableSpec:
        if self.lora and self.llm:
            raise ValueError("lora and llm are exclusive: LoRA adapts a frozen LLM, llm trains all of it")
        return self


class PromptSpec(Section):
    """Sa2VA's prompt texts. `{input}`, `{expression}` are filled in; `<image>` marks the image tokens."""

    chat: str = Field("<|user|>\n{input}<|end|>\n<|assistant|>\n", description="phi3-style turn template.")
    region: str = "<image>\nThere are 1 part regions in the picture: region1<region>.\n{question}"
    region_question: str = "Please give me a short description of the region in the picture marked by region1."
    segment_question: str = "<image>\nPlease segment {expression} in this image."
    segment_answer: str = "Sure, [SEG]."
    answer_end: str | None = Field(
        None,
        min_length=1,
        description="The token that ends every answer and stops caption "
        "generation: Sa2VA's template suffix (phi3_chat `<|end|>`, qwen_chat and "
        "internlm2_chat `<|im_end|>`). None: the tokenizer's eos token. Must be one "
        "token of the tokenizer.",
    )


class ModelSpec(Section):
    pretrained: str | None = Field(
        None, description="A dualrl model directory to start from (model.safetensors + tokenizer files + arch.json)."
    )
    vlm: str | None = Field(
        None,
        description="A transformers-native InternVL directory (config.json, "
        "safetensors, tokenizer), e.g. InternVL2.5-4B converted to the HF format, whose weights "
        "start the VLM; SAM2 then comes from model.sam.checkpoint. vision/text must describe it "
        "(differences are listed). Exclusive with `pretrained` and `sa2va`.",
    )
    sa2va: str | None = Field(
        None,
        description="A Sa2VA Hugging Face checkpoint directory (model.safetensors "
        "or its sharded index, tokenizer files, config.json) whose weights start the model. "
        "vision/text/sam must describe its architecture; a mismatch is refused with a key "
        "report. Exclusive with `pretrained`.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run the tokenizer code shipped in "
        "the model.sa2va / model.vlm directory (InternLM2's tokenizer, Sa2VA-8B, "
        "is only there). Local files only; nothing is downloaded.",
    )
    init_from: str | None = Field(
        None,
        description="A dualrl training run (its output_dir, its checkpoints/ "
        "folder or one step_N folder) whose trainable weights start this run, on top "
        "of `pretrained`: how grpo continues from an sft_dual run.",
    )
    init_weights: Literal["ema", "policy"] = Field(
        "ema", description="Which weights of `init_from` to take: the EMA teacher's or the student's."
    )
    vision: VisionSpec = Field(default_factory=VisionSpec)
    text: TextSpec = Field(default_factory=TextSpec)
    sam: SamSpec = Field(default_factory=SamSpec)
    trainable: TrainableSpec = Field(default_factory=TrainableSpec)
    prompts: PromptSpec = Field(default_factory=PromptSpec)
    multimask: bool = Field(
        True,
        description="Decode 3 masks, keep the best by predicted IoU (Sa2VA); "
        "False: single-mask output, steadier from scratch.",
    )
    max_caption_tokens: int = Field(24, gt=0, le=512)
    seed: int = Field(0, description="Seed of the random init.")
    precision: Literal["float32", "bf16"] = Field(
        "float32",
        description="bf16: frozen weights stored in "
        "bfloat16, trainable ones in float32, forward passes under "
        "bf16 autocast (Sa2VA trains with bf16 mixed precision).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernels of the VLM (flash_attention_2 needs the flash-attn package)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute the LLM's activations in the backward pass (less memory, ~30 % more compute)."
    )
    generation: Literal["engine", "generate"] = Field(
        "engine",
        description="How captions are decoded. engine: dualrl's decoder (model/decode.py: one prefill "
        "per region shared by its samples, a fixed-shape decode step replayed as a CUDA graph on GPUs; its "
        "attention is sdpa whatever attn_implementation trains, eager stays eager). generate: transformers' "
        "generate, every sample its own prompt (the path before 0.5; same greedy captions).",
    )
    decode_graphs: bool = Field(
        True,
        description="engine on CUDA: capture the decode step as a CUDA graph "
        "(once per number of rows and prompt capacity); False runs it eagerly.",
    )
    decode_compile: bool = Field(
        False,
        description="engine: compile the decode step with torch.compile before "
        "capturing it (fuses its hundreds of small elementwise kernels; each new number "
        "of rows or prompt capacity compiles once, tens of seconds on a 4B model).",
    )
    decode_merge_lora: bool = Field(
        True,
        description="engine: decode with LoRA folded into a copy of each adapted "
        "weight (one product per layer instead of the adapter's extra kernels; costs "
        "that copy's memory, 5.5 GB at Sa2VA-4B's LoRA, kept between calls). Same "
        "captions up to rounding: in bf16, W + BA rounded once shifts log-probs by "
        "bf16 noise (grpo/rollout_logp_gap shows the sampler-learner gap).",
    )
    generation_cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="generation=generate only: "
        "its KV cache; static preallocates it and compiles "
        "per prompt shape (same captions).",
    )


# ----------------------------------------------------------------------------------------------- data
class SourceSpec(Section):
    """What every source has: its share of the mixture and an optional cap on the samples it contributes."""

    weight: float = Field(1.0, ge=0, description="Relative share of training draws (0: off).")
    max_samples: int | None = Field(
        None,
        gt=0,
        description="Use only this many samples of the source (a fixed seeded subset, reshuffled each epoch).",
    )
    min_area: int = Field(0, ge=0, description="Masks under this many pixels (at the file's resolution) are skipped.")


class ShapesSpec(SourceSpec):
    """The built-in procedural referring data (no files)."""

    image_size: int = Field(128, ge=64)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(6, ge=1, le=6)
    train_size: int = Field(1_000_000, gt=0, description="Regions in the train split (drawn on the fly).")
    val_size: int = Field(64, gt=0)
    test_size: int = Field(256, gt=0)
    select_size: int = Field(
        256, gt=0, description="Regions in the `select` split: choose settings there, never on `val` or `test`."
    )
    seed: int = Field(0, ge=0)
    regions_per_scene: int = Field(
        1,
        ge=1,
        description="Consecutive training regions drawn from one scene "
        "(Sa2VA packs several referred objects per image).",
    )


class RefCocoSpec(SourceSpec):
    """RefCOCO / RefCOCO+ / RefCOCOg in the `refer` layout: <root>/<dataset>/instances.json + refs(<by>).p."""

    root: str = Field(..., description="Folder holding refcoco/, refcoco+/, refcocog/ (or the dataset folder).")
    images: str = Field(..., description="COCO train2014 images (COCO_train2014_<id:012>.jpg).")
    dataset: Literal["refcoco", "refcoco+", "refcocog"] = "refcoco"
    split_by: str | None = Field(
        None, description="refs(<split_by>).p; default unc (refcoco, refcoco+), umd (refcocog)."
    )
    split: str = Field("train", description="Training split: train, val, testA, testB (unc) or test (umd).")
    eval_split: str = "val"


class Sa1bSpec(SourceSpec):
    """SA-1B: sa_<n>.jpg + sa_<n>.json with COCO RLE masks; one sample per annotation, mask-only."""

    root: str = Field(..., description="Folder of sa_*.jpg/json, or of their extracted tar folders (shards).")
    min_area: int = Field(
        1024, ge=0, description="Masks under this many pixels are skipped (SA-1B has many tiny parts)."
    )
    files_per_shard: int = Field(1000, gt=0, description="Index shard size for a flat folder of files.")


class SavSpec(SourceSpec):
    """SA-V: sav_<n>.mp4 + sav_<n>_manual.json / _auto.json masklets; or pre-extracted .npz frame pairs."""

    root: str = Field(
        ...,
        description="Folder of sav_*.mp4 and their JSON (or sav_000/ style sub-folders), "
        "or of .npz pairs (frame1, mask1, frame2, mask2).",
    )
    annotations: Literal["manual", "auto", "both"] = "manual"
    pairs: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of samples that are frame pairs (describe frame "
        "t, segment frame t+k); the rest are single frames.",
    )
    pair_gap: int = Field(4, gt=0, description="k of a pair, in annotated frames (each 4 video frames).")
    min_area: int = Field(256, ge=0)


class OpenImagesSpec(SourceSpec):
    """OpenImages v7 segmentation: annotation CSV, class CSV, images, binary mask PNGs (or their zips)."""

    annotations: str = Field(..., description="train-annotations-object-segmentation.csv")
    classes: str = Field(..., description="oidv7-class-descriptions.csv (LabelName, DisplayName)")
    images: str = Field(..., description="Folder of <ImageID>.jpg")
    masks: str = Field(..., description="Folder of mask PNGs, or of train-masks-<c>.zip files")
    min_area: int = Field(256, ge=0)


class DataSpec(Section):
    shapes: ShapesSpec | None = Field(default_factory=ShapesSpec, description="Built-in data; null: off.")
    refcoco: RefCocoSpec | None = None
    sa1b: Sa1bSpec | None = None
    sav: SavSpec | None = None
    openimages: OpenImagesSpec | None = None
    expression_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of shapes training regions that "
        "carry a referring expression (RefCOCO-like); the rest are mask-only.",
    )
    batch_size: int = Field(8, gt=0)
    num_workers: int = Field(0, ge=0, description="Loader worker processes (decoding, resizing).")
    prefetch: int = Field(4, gt=0, description="Samples in flight per worker.")
    seed: int = Field(0, ge=0, description="Seed of the mixture and of every source's order.")
    image_size: int | None = Field(
        None,
        gt=0,
        description="Square working size of every region. Default: "
        "model.sam.image_size (1024 at real scale); shapes-only: shapes.image_size.",
    )
    aspect: Literal["squash", "pad"] = Field(
        "squash", description="squash: plain resize to the square (Sa2VA); pad: keep aspect, pad bottom/right."
    )
    max_image_pixels: int = Field(64_000_000, gt=0, description="Larger images are skipped unread.")
    cache_dir: str | None = Field(
        "~/.cache/dualrl/index", description="Where shard indexes are cached; null: rebuild every run."
    )
    all_bad_after: int = Field(64, gt=0, description="A source whose first N draws are all bad stops the run.")
    eval_source: Literal["auto", "shapes", "refcoco"] = Field(
        "auto", description="Held-out referring data: auto = refcoco when configured, else shapes."
    )
    eval_size: int = Field(256, gt=0, description="Regions of the refcoco eval split used (shapes: val_size).")


# ------------------------------------------------------------------------------------------ algorithm
class LossSpec(Section):
    """Sa2VA's mask losses."""

    bce_weight: float = Field(2.0, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    llm_weight: float = Field(1.0, ge=0)
    point_sampling: bool = True
    num_points: int = Field(12544, gt=0)
    oversample_ratio: float = Field(3.0, ge=1)
    importance_sample_ratio: float = Field(0.75, ge=0, le=1)


class SftDualSpec(Section):
    """The differentiable dual loop: EMA caption -> student soft tokens -> [SEG] -> SAM2 -> mask loss."""

    dual_weight: float = Field(1.0, ge=0, description="Weight of the soft-caption segmentation loss.")
    ref_weight: float = Field(1.0, ge=0, description="Weight of supervised referring segmentation.")
    caption_weight: float = Field(
        0.5,
        ge=0,
        description="LM loss of the student describing regions that "
        "carry a reference (anchors the captioner to language).",
    )
    gumbel_tau: float = Field(0.7, gt=0)
    gumbel_top_k: int = Field(128, gt=0)
    caption_token_dropout: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of teacher caption tokens replaced by padding in the student's teacher-forced input.",
    )


class PretrainSpec(Section):
    """Supervised referring segmentation + region captioning (Sa2VA's own kind of training)."""

    ref_weight: float = Field(1.0, ge=0)
    caption_weight: float = Field(1.0, ge=0)
    point_weight: float = Field(
        0.0,
        ge=0,
        description="Mask loss of SAM2 prompted by one click inside each "
        "region (SAM's interactive training): teaches the from-scratch mask head to "
        "segment whatever it is pointed at, as pretrained SAM2 already can.",
    )


class GrpoSpec(Section):
    """GRPO on the captioner (knob names as TRL's GRPOConfig); the segmenter keeps its SFT mask loss."""

    num_generations: int = Field(8, ge=2, description="G: captions sampled per region.")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int | None = Field(
        None, gt=0, description="Caption tokens per sample (None: model.max_caption_tokens)."
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip of the ratio: 1 - epsilon.")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip: 1 + epsilon_high (None: epsilon; DAPO's clip-higher uses e.g. 0.28)."
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="k3 KL to a frozen copy of the starting captioner (0: none, and no reference model is built).",
    )
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    num_iterations: int = Field(
        1,
        ge=1,
        description="Optimizer updates per rollout batch (the first pass's "
        "log-probs are kept as the old policy's for the ratios).",
    )
    policy_weight: float = Field(1.0, ge=0, description="Weight of the GRPO term in the learner's loss.")
    seg_target: Literal["reference_or_best", "reference", "best"] = Field(
        "reference_or_best",
        description="What the segmenter's SFT mask loss segments from: a region's "
        "reference expression, its best-rewarded caption, or the reference where there is one, else the best.",
    )
    seg_weight: float = Field(1.0, ge=0, description="Weight of the segmenter's BCE + dice loss.")


class AlgoSpec(Section):
    name: Literal["pretrain", "sft_dual", "grpo"] = "sft_dual"
    loss: LossSpec = Field(default_factory=LossSpec)
    sft_dual: SftDualSpec = Field(default_factory=SftDualSpec)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    grpo: GrpoSpec = Field(default_factory=GrpoSpec)
    ema_decay: float = Field(0.999, ge=0, lt=1)


class OptimSpec(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    accumulation: int = Field(
        1,
        ge=1,
        description="Split each step's batch into this many micro-batches: one "
        "forward/backward each, one optimizer step (Sa2VA: 2 regions x 4 per GPU).",
    )


class TrainSpec(Section):
    steps: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    save_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    sync_every: int = Field(1, gt=0, description="Steps between weight syncs to the rollout/reward workers.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (None: torch's default).")
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
    every: int = Field(100, gt=0)
    at_start: bool = True
    batch_size: int = Field(32, gt=0)
    split: Literal["val", "select"] = Field(
        "val",
        description="Held-out regions the run evaluates on: `val`, or `select` (shapes only: a disjoint split "
        "for choosing settings, so that `val` figures stay unbiased).",
    )


class RuntimeSpec(Section):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray address to join; None starts a local instance.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a locally started Ray.")
    worker_cpus: float = Field(0.0, ge=0, description="num_cpus of each actor (0 lets 3 actors share 2 cores).")
    worker_gpus: float = Field(0.0, ge=0)


class WandbSpec(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dualrl"
    name: str | None = None
    table_rows: int = Field(8, ge=0, description="Regions shown in the eval overlay table.")


class RewardSpec(BaseModel):
    """One reward plugin: a built-in `name`, a `module:attr`, or `path` (a .py file) + `name` (a function or
    class in it). Keys other than the ones below are the plugin's own options."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    path: str | None = None
    weight: float = 1.0
    timeout_s: float = Field(60.0, gt=0, description="A call that takes longer is a failure of that step.")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def key(self) -> str:
        """The name metrics are logged under (`reward/<key>`)."""
        return self.name.rpartition(":")[2]


class Recipe(Section):
    output_dir: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    algo: AlgoSpec = Field(default_factory=AlgoSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="mask_iou")],
        description="Reward plugins and their weights; their weighted sum drives grpo and is "
        "logged as reward/total by every algorithm.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.data.shapes is not None and self.data.shapes.min_objects > self.data.shapes.max_objects:
            raise ValueError("data.shapes.min_objects must not exceed data.shapes.max_objects")
        keys = [r.key for r in self.rewards]
        if len(set(keys)) != len(keys):
            raise ValueError(f"rewards: two plugins log under the same name ({keys})")
        if self.algo.name == "grpo" and not any(r.weight for r in self.rewards):
            raise ValueError("algo.name=grpo needs at least one reward with a non-zero weight in `rewards`")
        return self


# ------------------------------------------------------------------------------------------- loading
def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """`a.b=v` sets a nested key; a numeric part indexes a list (`rewards.1.weight=0.5`)."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override {key}: {part!r} is not an index of a {len(node)}-entry list")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            elif node.get(part) is None:  # a section switched off with null comes back with its defaults
                node[part] = {}
            node = node[part]
        else:
            raise RecipeError(f"override {key}: {parts[i - 1]} is a value, not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as YAML, so `x=[1,2]`, `x=null`, `x=true` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: value {raw!r} is not valid YAML ({err})") from err
    return key, value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            section = _section_at(e["loc"][:-1])
            if section is not None:
                msg += f"; allowed here: {', '.join(section.model_fields)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg += f" (got {e.get('input')!r})"
        lines.append(f"  {path}: {msg}")
    return "invalid recipe:\n" + "\n".join(lines)


def _section_at(loc: tuple) -> type[Section] | None:
    cls: type[Section] = Recipe
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, Section)):
            return None
        cls = ann
    return cls


def check_paths(recipe: Recipe) -> None:
    """Files the recipe names must exist before anything is built."""
    pretrained = recipe.model.pretrained
    if pretrained is not None and not (Path(pretrained) / "model.safetensors").is_file():
        raise RecipeError(
            f"model.pretrained: no dualrl model at {pretrained!r} (expected model.safetensors "
            "there). Build it with `python -m dualrl.launch recipes/pretrain_tiny.yaml` or set "
            "model.pretrained=null to start from random init."
        )
    if sum(x is not None for x in (pretrained, recipe.model.sa2va, recipe.model.vlm)) > 1:
        raise RecipeError("model.pretrained, model.sa2va and model.vlm are exclusive: set one of them")
    vlm = recipe.model.vlm
    if vlm is not None and not (Path(vlm).expanduser() / "config.json").is_file():
        raise RecipeError(f"model.vlm: no transformers model directory at {vlm!r} (expected config.json there)")
    sa2va = recipe.model.sa2va
    if sa2va is not None:
        if pretrained is not None:
            raise RecipeError("model.sa2va and model.pretrained are exclusive: set one of them")
        folder = Path(sa2va).expanduser()
        if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise RecipeError(
                f"model.sa2va: no Sa2VA checkpoint at {sa2va!r} (expected model.safetensors or "
                "model.safetensors.index.json there)"
            )
    ckpt = recipe.model.sam.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        raise RecipeError(f"model.sam.checkpoint: file not found: {ckpt!r}")
    if recipe.model.init_from is not None:
        from dualrl.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(recipe.model.init_from)
        except FileNotFoundError as err:
            raise RecipeError(f"model.init_from: {err}") from None
    check_data_paths(recipe.data)


# Recipe keys of each source that name files or folders, and what is expected there.
DATA_PATHS = {
    "refcoco": {
        "root": "the folder of refcoco/, refcoco+/, refcocog/ (instances.json + refs(*).p)",
        "images": "the COCO train2014 image folder",
    },
    "sa1b": {"root": "the SA-1B folder (sa_*.jpg + sa_*.json, or their extracted tar folders)"},
    "sav": {"root": "the SA-V folder (sav_*.mp4 + sav_*_manual.json, or .npz frame pairs)"},
    "openimages": {
        "annotations": "train-annotations-object-segmentation.csv",
        "classes": "oidv7-class-descriptions.csv",
        "images": "the folder of <ImageID>.jpg",
        "masks": "the folder of mask PNGs or train-masks-<c>.zip files",
    },
}


def check_data_paths(data: DataSpec) -> None:
    """Every data path of an enabled source exists; the message names the recipe key."""
    for name, keys in DATA_PATHS.items():
        spec = getattr(data, name)
        if spec is None or (spec.weight == 0 and not (name == "refcoco" and data.eval_source != "shapes")):
            continue
        for key, what in keys.items():
            path = Path(getattr(spec, key)).expanduser()
            if not path.exists():
                raise RecipeError(
                    f"data.{name}.{key}: {what} not found at '{path}'. Set it in the recipe or "
                    f"with data.{name}.{key}=/path/to/it, or switch the source off with "
                    f"data.{name}=null."
                )


def check_rewards(recipe: Recipe) -> None:
    """Every reward plugin can be found and takes the options the recipe gives it."""
    from rewards.registry import RewardConfigError, resolve_plugin

    for i, spec in enumerate(recipe.rewards):
        try:
            resolve_plugin(spec)
        except RewardConfigError as err:
            raise RecipeError(f"rewards[{i}] ({spec.key}): {err}") from None


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a dict. `extends: other.yaml` (relative to the file) starts from that recipe; this
    file's sections are merged into it key by key, so a variant states only what differs. A list of files
    is merged in order, later over earlier (e.g. a model recipe, then an algorithm part)."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {str(path)!r}")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `extends` loops back to it")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(loaded).__name__}")
    parents = loaded.pop("extends", None)
    if parents is None:
        return loaded
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{path}: `extends` takes a recipe file or a list of them")
    tree: dict[str, Any] = {}
    for parent in parents:
        tree = _merge(tree, _read_tree(path.parent / parent, (*seen, path.resolve())))
    return _merge(tree, loaded)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def load_recipe(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply overrides, validate, check paths."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree.update(_read_tree(Path(path)))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_errors(err)) from None
    check_paths(recipe)
    check_rewards(recipe)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
