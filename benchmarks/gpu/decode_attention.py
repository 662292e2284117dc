"""Decode-step attention at the 4B rollout's shape: which way of attending one query token per row is fastest.

    python3 benchmarks/gpu/decode_attention.py [--rows 64] [--slots 256 448 1024] [--out decode_attention.json]

One decode step attends each of `rows` rows' 16 query heads (2 key/value groups of 8) over a cache of `slots`
slots, with an additive mask (left padding and the answer slots not yet written). The ways compared, each
captured as a CUDA graph of `layers` calls (as a decode step's layers are replayed) and timed by CUDA events:
- `sdpa_grouped`: what the decoder does today (`packed_sdpa`): the query heads of one group as its query
  positions, sdpa choosing its kernel;
- `sdpa_<backend>`: the same with one backend forced (efficient, cudnn, math);
- `matmul`: scores = q kᵀ, softmax in float32, probs v, as two batched products (the cache read once each);
- `matmul_compiled`: the same under torch.compile.
The roofline is the cache's bytes (keys and values read once) at the measured copy bandwidth. Prints each way's
time per call and its ratio to `sdpa_grouped`, and checks each against the float32 reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ceilings


def grouped_sdpa(q, k, v, mask, scale):
    b, heads, _, dim = q.shape
    groups = k.shape[1]
    out = F.scaled_dot_product_attention(q.view(b, groups, heads // groups, dim), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, 1, dim)


def matmul_attention(q, k, v, mask, scale):
    b, heads, _, dim = q.shape
    groups = k.shape[1]
    scores = torch.matmul(q.view(b, groups, heads // groups, dim), k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores + mask, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, heads, 1, dim)


def timed(fn, args, layers: int, repeats: int) -> float:
    """Seconds per call of `fn`, from a CUDA graph of `layers` calls replayed `repeats` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (repeats * layers)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--slots", type=int, nargs="+", default=[256, 448, 1024])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: decode_attention.py measures CUDA kernels; no CUDA device here", file=sys.stderr)
        return 2
    rates = ceilings("cuda")
    compiled = torch.compile(matmul_attention)
    ways = {"sdpa_grouped": grouped_sdpa, "matmul": matmul_attention, "matmul_compiled": compiled}
    backends = {
        "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
        "math": torch.nn.attention.SDPBackend.MATH,
    }
    result = {"ceilings": rates, "shapes": {}}
    for slots in args.slots:
        torch.manual_seed(0)
        q = torch.randn(args.rows, args.heads, 1, args.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(args.rows, args.kv_heads, slots, args.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        allowed = torch.rand(args.rows, 1, 1, slots, device="cuda") > 0.2
        allowed[..., -1] = True
        mask = torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16).masked_fill_(~allowed, -1e30)
        scale = args.head_dim**-0.5
        reference = matmul_attention(q.float(), k.float(), v.float(), mask.float(), scale)
        roofline = 2 * k.numel() * k.element_size() / rates["copy_bytes_per_s"]
        shape = {"roofline_s": roofline}
        calls = dict(ways)
        for name, backend in backends.items():
            calls[f"sdpa_{name}"] = _forced(backend)
        for name, fn in calls.items():
            try:
                error = float((fn(q, k, v, mask, scale).float() - reference).abs().max())
                seconds = timed(fn, (q, k, v, mask, scale), args.layers, args.repeats)
            except RuntimeError as err:  # a backend that does not take this shape says so
                shape[name] = {"error": str(err).splitlines()[0][:200]}
                print(f"slots {slots} {name}: {shape[name]['error']}", flush=True)
                continue
            shape[name] = {"seconds": seconds, "max_abs_error": error, "of_roofline": roofline / seconds}
        base = shape["sdpa_grouped"]["seconds"]
        for name in calls:
            if "seconds" in shape[name]:
                shape[name]["vs_sdpa_grouped"] = base / shape[name]["seconds"]
                print(
                    f"slots {slots} {name}: {shape[name]['seconds'] * 1e6:.1f} us "
                    f"({shape[name]['vs_sdpa_grouped']:.2f}x sdpa_grouped, {shape[name]['of_roofline']:.0%} of "
                    f"roofline, max error {shape[name]['max_abs_error']:.1e})",
                    flush=True,
                )
        result["shapes"][str(slots)] = shape
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def _forced(backend):
    def call(q, k, v, mask, scale):
        with torch.nn.attention.sdpa_kernel(backend):
            return grouped_sdpa(q, k, v, mask, scale)

    return call


if __name__ == "__main__":
    sys.exit(main())
