"""The built-in procedural data as a source: one shard of `train_size` regions, already in random order.

Scene i is an independent draw, so the stream needs no permutation; `data.seed` instead picks where in the train
split a run starts: `order_seed * ORDER_STRIDE` scenes in (modulo the split), so runs of different data seeds see
different scenes and seed 0 sees scenes 0, 1, 2, ... Held-out splits are never moved."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dualrl.data.scenes import ShapesDataset
from dualrl.data.sources.base import Shard, Source
from dualrl.data.transforms import square

if TYPE_CHECKING:
    from dualrl.recipe import ShapesSpec


# Scenes between the starts of two consecutive data seeds (a prime above the regions any run here draws: 300 steps of
# 8 regions are 2,400), so the seeds' windows of a 1,000,000-scene train split do not overlap for the first ten seeds.
ORDER_STRIDE = 100_003


class ShapesSource(Source):
    name = "shapes"
    shuffle = False  # item i is an independent random scene already

    def __init__(
        self,
        spec: ShapesSpec,
        size: int,
        split: str = "train",
        expression_fraction: float = 1.0,
        order_seed: int = 0,
        **kw,
    ):
        super().__init__(spec, size, **kw)
        sizes = {"train": spec.train_size, "val": spec.val_size, "test": spec.test_size, "select": spec.select_size}
        if split not in sizes:
            raise ValueError(f"shapes has the splits {', '.join(sizes)}; got {split!r}")
        n = sizes[split]
        self.dataset = ShapesDataset(
            split,
            n,
            image_size=spec.image_size,
            seed=spec.seed,
            min_objects=spec.min_objects,
            max_objects=spec.max_objects,
            expression_fraction=expression_fraction,
            regions_per_scene=spec.regions_per_scene if split == "train" else 1,
            contrast=spec.contrast,
            referred_contrast=spec.referred_contrast if split == "train" else None,
        )
        self.cache_dir = None  # nothing to index
        self.offset = (order_seed * ORDER_STRIDE) % n if split == "train" and n else 0

    def shards(self) -> list[str]:
        return [self.dataset.split]

    def build_shard(self, shard: str) -> Shard:
        return Shard(len(self.dataset))

    def key(self, index: Shard, shard: str, i: int) -> tuple:
        return ((i + self.offset) % len(self.dataset),)

    def load(self, key: tuple, seed: int) -> dict[str, Any]:
        item = self.dataset[key[0]]
        if item["image"].shape[-1] != self.size:  # mixed with real data at another working size
            image, mask = square(item["image"].permute(1, 2, 0).numpy(), item["mask"].numpy(), self.size, self.aspect)
            item.update(image=image, mask=mask)
        return item
