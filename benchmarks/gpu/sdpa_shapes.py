"""What a new sequence length costs attention in training: sdpa forward + backward with a padding mask, as the learner
calls it (keys and values repeated per query head, a boolean [B, 1, L, L] mask), on each backend, for lengths never
seen before (first call) and again (second call).

    python benchmarks/gpu/sdpa_shapes.py [--lengths 437 481 530 602 655] [--batch 12] [--out sdpa_shapes.json]

A backend that prepares a plan per shape (cuDNN) pays its first call at every new length; learner batches bring new
lengths at almost every step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import facts, sync

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def one_call(batch: int, heads: int, length: int, dim: int, backend: SDPBackend, device: str) -> float:
    q, k, v = (
        torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    real = torch.randint(length // 2, length + 1, (batch,), device=device)
    keys = torch.arange(length, device=device)
    mask = (keys[None, None, :] <= keys[None, :, None]) & (keys[None, None, None, :] < real[:, None, None, None])
    sync()
    t = time.perf_counter()
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.float().sum().backward()
    sync()
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[437, 481, 530, 602, 655])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"facts": facts(), "batch": args.batch, "heads": args.heads, "dim": args.dim, "backends": {}}
    for name, backend in BACKENDS.items():
        if device == "cpu" and name != "math":
            continue
        rows = []
        for length in args.lengths:
            first = one_call(args.batch, args.heads, length, args.dim, backend, device)
            second = one_call(args.batch, args.heads, length, args.dim, backend, device)
            rows.append({"length": length, "first_s": first, "second_s": second})
            print(f"{name:9s} L {length:5d}: first {first * 1e3:8.1f} ms, second {second * 1e3:7.2f} ms", flush=True)
        result["backends"][name] = rows
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
