"""The `data:` section: the sources a run mixes (each its own sub-section, null when off), how regions are brought
to one working square, and the loader."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dualrl.recipe.section import MAX_BATCH, MAX_IMAGE_SIZE, Section, section_type


class SourceSpec(Section):
    """What every source has: its share of the mixture and an optional cap on the samples it contributes."""

    weight: float = Field(
        1.0,
        ge=0,
        description="Relative share of training draws; the shares of enabled sources are normalised (0: off).",
    )
    max_samples: int | None = Field(
        None,
        gt=0,
        description="Use only this many samples of the source (a fixed seeded subset, reshuffled each epoch); "
        "null: all of them.",
    )
    min_area: int = Field(0, ge=0, description="Masks under this many pixels (at the file's resolution) are skipped.")


class ShapesSpec(SourceSpec):
    """The built-in procedural referring data (no files)."""

    image_size: int = Field(
        128,
        ge=64,
        le=MAX_IMAGE_SIZE,
        description="Side in pixels at which the scenes are drawn (shapes scale with it). A shapes-only run also "
        "works at this size; otherwise the drawn scenes are resized to the working square (data.image_size).",
    )
    min_objects: int = Field(1, ge=1, description="Fewest objects in a scene; at most max_objects.")
    max_objects: int = Field(6, ge=1, le=6, description="Most objects in a scene (1-6).")
    train_size: int = Field(1_000_000, gt=0, description="Regions in the train split (drawn on the fly).")
    val_size: int = Field(64, gt=0, description="Regions in the `val` split, evaluated during training.")
    test_size: int = Field(256, gt=0, description="Regions in the `test` split, for final reports (dualrl.eval).")
    select_size: int = Field(
        256, gt=0, description="Regions in the `select` split: choose settings there, never on `val` or `test`."
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the scenes themselves: which scenes make up every split. Not the run's seed "
        "(train.seed) nor the draw order (data.seed): keep it when comparing seeds, so every run is evaluated on "
        "the same held-out regions.",
    )
    regions_per_scene: int = Field(
        1,
        ge=1,
        description="Consecutive training regions drawn from one scene (Sa2VA packs several referred objects per "
        "image).",
    )
    contrast: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Contrast of every scene about its mean grey, held-out splits included: 1 as drawn, less a "
        "washed-out look (a camera of another exposure, a hazy scene).",
    )
    referred_contrast: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Contrast of the train split's regions that carry an expression; null: contrast. With "
        "contrast < 1 and this 1, the expressions come from clean scenes while the mask-only regions and the "
        "held-out splits are washed out: a look the expressions do not cover, as when RefCOCO's expressions are "
        "mixed with another dataset's masks.",
    )


RefCocoSplit = Literal["train", "val", "testA", "testB", "test"]
REFCOCO_SPLITS: tuple[str, ...] = RefCocoSplit.__args__


class RefCocoSpec(SourceSpec):
    """RefCOCO / RefCOCO+ / RefCOCOg in the `refer` layout: <root>/<dataset>/instances.json + refs(<by>).p."""

    root: str = Field(..., description="Folder holding refcoco/, refcoco+/, refcocog/ (or the dataset folder).")
    images: str = Field(..., description="COCO train2014 images (COCO_train2014_<id:012>.jpg).")
    dataset: Literal["refcoco", "refcoco+", "refcocog"] = Field(
        "refcoco", description="Which of the three datasets under `root` to read."
    )
    split_by: str | None = Field(
        None, description="Which refs(<split_by>).p file; null: unc (refcoco, refcoco+), umd (refcocog)."
    )
    split: RefCocoSplit = Field("train", description="Training split: train, val, testA, testB (unc) or test (umd).")
    eval_split: RefCocoSplit = Field(
        "val", description="Split evaluated when refcoco is the eval source (data.eval_source); same names as `split`."
    )


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
        description="Folder of sav_*.mp4 and their JSON (or sav_000/ style sub-folders), or of .npz pairs (frame1, "
        "mask1, frame2, mask2).",
    )
    annotations: Literal["manual", "auto", "both"] = Field(
        "manual", description="Which masklets to read: sav_<n>_manual.json, sav_<n>_auto.json, or both."
    )
    pairs: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of samples that are frame pairs (describe frame t, segment frame t+k); the rest are "
        "single frames.",
    )
    pair_gap: int = Field(4, gt=0, description="k of a pair, in annotated frames (each 4 video frames).")
    min_area: int = Field(
        256, ge=0, description="Masks under this many pixels (at the video's resolution) are skipped."
    )


class OpenImagesSpec(SourceSpec):
    """OpenImages v7 segmentation: annotation CSV, class CSV, images, binary mask PNGs (or their zips)."""

    annotations: str = Field(..., description="train-annotations-object-segmentation.csv")
    classes: str = Field(..., description="oidv7-class-descriptions.csv (LabelName, DisplayName)")
    images: str = Field(..., description="Folder of <ImageID>.jpg")
    masks: str = Field(..., description="Folder of mask PNGs, or of train-masks-<c>.zip files")
    min_area: int = Field(
        256, ge=0, description="Masks under this many pixels (at the mask PNG's resolution) are skipped."
    )


class DataSpec(Section):
    """Training data: a seeded mixture of the enabled sources, each region brought to one square working size."""

    shapes: ShapesSpec | None = Field(default_factory=ShapesSpec, description="Built-in data; null: off.")
    refcoco: RefCocoSpec | None = Field(None, description="RefCOCO/+/g referring data; null: off.")
    sa1b: Sa1bSpec | None = Field(None, description="SA-1B masks (mask-only); null: off.")
    sav: SavSpec | None = Field(None, description="SA-V video masklets (mask-only); null: off.")
    openimages: OpenImagesSpec | None = Field(None, description="OpenImages v7 segmentation masks; null: off.")
    expression_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of shapes training regions that carry a referring expression (RefCOCO-like); the rest "
        "are mask-only.",
    )
    batch_size: int = Field(
        8,
        gt=0,
        le=MAX_BATCH,
        description="Regions per training step (grpo samples num_generations captions for each).",
    )
    num_workers: int = Field(0, ge=0, description="Loader worker processes (decoding, resizing); 0: in-process.")
    prefetch: int = Field(
        4, gt=0, description="Samples in flight per worker, rounded up to whole chunks (8 with the defaults)."
    )
    chunk: int = Field(
        8,
        gt=0,
        description="Samples a loader worker loads and sends as one message (with num_workers > 0): the training "
        "process pays for each message it receives (8 a message: half the CPU time of one a sample, "
        "benchmarks/loader_transport.py). At least one chunk is in flight per worker: with large images, mind "
        "the memory of num_workers x chunk samples.",
    )
    receive_thread: bool = Field(
        True,
        description="With loader workers: a thread of the training process takes their messages off the pipe "
        "(unpickling, milliseconds a batch), so that receiving runs while the training thread waits for the GPU "
        "instead of adding to the step; it holds up to two batches' samples ahead. Batches, positions and "
        "load-time skips are the same either way (index-time skips count the shards indexed so far, which runs "
        "further ahead with it).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Seed of the mixture's draws and of every source's sample order (shapes, whose scenes are "
        "independent draws already, starts its train stream at a seed-given scene instead; seed 0 at scene 0). null: "
        "the same as train.seed. Not data.shapes.seed, which fixes the scenes themselves.",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        le=MAX_IMAGE_SIZE,
        description="Square working size every region is brought to in the loader, in pixels; SAM2 and the VLM "
        "each resize from it to their own input (model.sam.image_size, model.vision.image_size). null: "
        "model.sam.image_size (1024 at real scale), or data.shapes.image_size in a shapes-only run.",
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
    eval_size: int = Field(
        256, gt=0, description="Regions of the refcoco eval split used (shapes: its val_size or select_size)."
    )

    @classmethod
    def source_names(cls) -> list[str]:
        """Every data source, in field order: the sub-sections that are sources."""
        return [n for n, f in cls.model_fields.items() if issubclass(section_type(f.annotation) or Section, SourceSpec)]

    def training_sources(self) -> list[str]:
        """The sources a training run mixes: configured, with a weight > 0."""
        return [n for n in self.source_names() if getattr(self, n) is not None and getattr(self, n).weight > 0]

    def held_out_source(self) -> str:
        """The source evaluated during training: eval_source, where auto is refcoco when configured, else shapes."""
        if self.eval_source != "auto":
            return self.eval_source
        return "refcoco" if self.refcoco is not None else "shapes"
