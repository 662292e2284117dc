"""Datasets from the recipe and a resumable training stream.

The stream is a function of (dataset, batch size, position): a resumed run asks for the batches from the
saved position on, so it neither replays nor skips data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dualrl.data.shapes import ShapesDataset, collate_regions


def build_datasets(data_spec) -> tuple[Dataset, Dataset]:
    s = data_spec.shapes
    common = {"image_size": s.image_size, "seed": s.seed, "min_objects": s.min_objects, "max_objects": s.max_objects}
    train = ShapesDataset("train", s.train_size, expression_fraction=data_spec.expression_fraction,
                          regions_per_scene=s.regions_per_scene, **common)
    val = ShapesDataset("val", s.val_size, expression_fraction=1.0, **common)
    return train, val


class _FromPosition(Sampler[int]):
    """Indices position, position+1, ... wrapping around the dataset (items are already shuffled scenes)."""

    def __init__(self, size: int, position: int, count: int):
        self.size, self.position, self.count = size, position, count

    def __iter__(self) -> Iterator[int]:
        return ((self.position + k) % self.size for k in range(self.count))

    def __len__(self) -> int:
        return self.count


def train_stream(dataset: Dataset, batch_size: int, position: int, steps: int, num_workers: int = 0):
    sampler = _FromPosition(len(dataset), position, steps * batch_size)
    # Its own generator: creating the iterator must not draw from the global RNG, which a resumed run
    # restores and must find exactly as the uninterrupted run had it.
    return iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_regions,
                           num_workers=num_workers, persistent_workers=False, generator=torch.Generator(),
                           prefetch_factor=4 if num_workers else None))


def eval_batches(dataset: Dataset, batch_size: int):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_regions)
