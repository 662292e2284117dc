"""What receiving a batch from the loader workers costs the training process: samples whose images and masks
travel as torch tensors (one shared-memory file each) against numpy arrays (pickled into the pipe), as
`dualrl.data.loader` sends them since 0.5.

    python benchmarks/loader_transport.py [--size 256] [--batch 64] [--batches 8] [--workers 2] [--rounds 2]
        [--chunk 8]

Three transports run in this process, alternately (the third: numpy arrays, `--chunk` samples a message, as
`dualrl.data.loader` sends them since 0.6), on built-in shapes samples at `--size` (pretrain_tiny's
working size is 256); the figure is the training process's CPU time per batch while it only receives (the
workers draw and send), and the wall time per batch. Ratios are tensor / numpy and numpy a sample / numpy a chunk.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from dualrl.data.batch import collate_regions
from dualrl.data.scenes import ShapesDataset


class _Samples(Dataset):
    def __init__(self, size: int, arrays: bool):
        self.data, self.arrays = ShapesDataset("train", 1_000_000, image_size=size), arrays

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int | list[int]) -> dict | list[dict]:
        if isinstance(i, list):  # a chunk of draws: one message for all of them
            return [self[k] for k in i]
        item = self.data[i]
        if self.arrays:
            item = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return item


class _Chunks(torch.utils.data.Sampler):
    def __init__(self, size: int):
        self.size = size

    def __iter__(self):
        for start in range(0, 1_000_000, self.size):
            yield list(range(start, start + self.size))


def receive(transport: str, args) -> tuple[float, float]:
    chunked = transport == "chunks"
    loader = DataLoader(
        _Samples(args.size, transport != "tensors"),
        batch_size=None,
        sampler=_Chunks(args.chunk) if chunked else None,
        num_workers=args.workers,
        prefetch_factor=16 if not chunked else max(1, 16 // args.chunk),  # the same samples in flight
        collate_fn=lambda x: x,
    )
    it = iter(loader)

    def batch():
        if chunked:
            return collate_regions([x for _ in range(-(-args.batch // args.chunk)) for x in next(it)][: args.batch])
        return collate_regions([next(it) for _ in range(args.batch)])

    batch()  # workers started, queues filled
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.batches):
        batch()
    n = args.batches
    return 1000 * (time.process_time() - cpu) / n, 1000 * (time.perf_counter() - wall) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=8, help="samples a message of the chunked transport")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"tensors": [], "arrays": [], "chunks": []}
    for _ in range(args.rounds):
        for name in results:
            results[name].append(receive(name, args))
            cpu, wall = results[name][-1]
            print(f"{name:8s} training-process CPU {cpu:6.1f} ms a batch, wall {wall:6.1f} ms a batch", flush=True)
    cpu = {k: statistics.median(c for c, _ in v) for k, v in results.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in results.items()}
    print(
        f"median of {args.rounds} rounds, batch {args.batch} at {args.size}^2, {args.workers} workers: CPU "
        f"{cpu['tensors']:.1f} vs {cpu['arrays']:.1f} ms ({cpu['tensors'] / cpu['arrays']:.2f}x), wall "
        f"{wall['tensors']:.1f} vs {wall['arrays']:.1f} ms ({wall['tensors'] / wall['arrays']:.2f}x); chunks of "
        f"{args.chunk} samples a message: CPU {cpu['chunks']:.1f} ms ({cpu['arrays'] / cpu['chunks']:.2f}x less "
        f"than one message a sample), wall {wall['chunks']:.1f} ms"
    )


if __name__ == "__main__":
    main()
