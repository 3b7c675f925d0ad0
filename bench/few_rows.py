"""Microseconds per call of a decoded token's dense products: lorakit's few-rows kernel against the libraries.

    PYTHONPATH=src python bench/few_rows.py --threads 2 --dtype float32

A decoded token multiplies a few rows (the batch) by every frozen weight of the model once. This times those
products as a token runs them: the 210 projection weights of SmolLM2-135M (30 layers of q, k, v, o, gate, up,
down), each a separate tensor read from memory in turn, on 1-32 rows, for each backend:

    kernel   lorakit's few-rows kernel (ops/csrc/linear_rows.cpp; what ops/matmul.py `linear` sends such products to)
    onednn   oneDNN's inner product (torch.ops.mkldnn._linear_pointwise; CPU bf16 and lorakit's fp32 elsewhere)
    aten     F.linear (MKL for fp32 on CPU)

and the output head (49,152 x 576, read once a token). The backends take turns, round after round; it prints the
median over --rounds of the mean time per call over one pass through the weights. docs/performance.md
(optimisations 39 and 42) quotes it for where `linear` takes the kernel. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (d_in, d_out) of one SmolLM2-135M decoder layer's projections, in a token's order
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
LAYERS = 30
HEAD = (576, 49152)


def backends(dtype: torch.dtype) -> dict:
    from lorakit.ops.cpu_extension import kernels_available

    found = {"aten": F.linear}
    if torch.backends.mkldnn.is_available():
        onednn = torch.ops.mkldnn._linear_pointwise
        found["onednn"] = lambda x, w: onednn(x, w, None, "none", [], "")
    if kernels_available() and str(dtype).removeprefix("torch.") in torch.ops.lorakit.linear_rows_dtypes():
        kernel = torch.ops.lorakit.linear_rows.default
        found["kernel"] = lambda x, w: kernel(x, w, None)
    return found


def pass_us(op, xs: dict, weights: list) -> float:
    """Mean microseconds per call over one pass through `weights`."""
    started = time.perf_counter()
    for w in weights:
        op(xs[w.shape[1]], w)
    return (time.perf_counter() - started) / len(weights) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rows", default="1,4,8,16,24,32", help="comma-separated row counts")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weights = [torch.randn(d_out, d_in).div_(d_in ** 0.5).to(dtype) for _ in range(LAYERS) for d_in, d_out in LAYER]
    head = [torch.randn(HEAD[1], HEAD[0]).div_(HEAD[0] ** 0.5).to(dtype)]
    ops = backends(dtype)
    print(f"{args.dtype} x @ W^T, {args.threads} thread(s), us per call (median of {args.rounds} rounds): "
          f"{len(weights)} projections cycled | the output head")
    print(f"{'rows':>4}  " + "  ".join(f"{name:>16}" for name in ops))
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {d_in: torch.randn(rows, d_in).to(dtype) for d_in in {576, 1536}}
        times = {name: ([], []) for name in ops}
        for _ in range(2):  # warm-up: each backend's first calls (kernel loading, primitive caches)
            for op in ops.values():
                pass_us(op, xs, weights)
        for _ in range(args.rounds):
            for name, op in ops.items():
                times[name][0].append(pass_us(op, xs, weights))
                times[name][1].append(pass_us(op, xs, head))
        cells = (f"{statistics.median(layer):7.1f} | {statistics.median(top):6.0f}" for layer, top in times.values())
        print(f"{rows:>4}  " + "  ".join(f"{cell:>16}" for cell in cells))


if __name__ == "__main__":
    main()
