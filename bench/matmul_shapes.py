"""GFLOP/s of oneDNN's bf16 matmul for the shapes of a SmolLM2 LoRA training step, at 256 and 1,024 rows.

    PYTHONPATH=src python bench/matmul_shapes.py --threads 2

`x @ W^T` for every projection (q, k/v, o, gate/up, down) and the rank-16 adapter products, on the kernel lorakit's
bf16 path runs (`torch.ops.mkldnn._linear_pointwise`, lorakit/ops/matmul.py). docs/performance.md quotes it for
the speed ceiling (the best rate at 1,024 rows) and for why batch 1 (256 rows) runs below it. A measurement, not
a test: the mean over --repeats calls after 10 warm-up calls.
"""

from __future__ import annotations

import argparse
import time

import torch

# (d_in, d_out) of SmolLM2-135M's projections and of a rank-16 adapter's A and B on them
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 16), (16, 576), (16, 1536), (1536, 16))


def microseconds_and_gflops(rows: int, d_in: int, d_out: int, repeats: int) -> tuple[float, float]:
    op = torch.ops.mkldnn._linear_pointwise
    x, w = torch.randn(rows, d_in).bfloat16(), torch.randn(d_out, d_in).bfloat16()
    for _ in range(10):
        op(x, w, None, "none", [], "")
    started = time.perf_counter()
    for _ in range(repeats):
        op(x, w, None, "none", [], "")
    seconds = (time.perf_counter() - started) / repeats
    return seconds * 1e6, 2 * rows * d_in * d_out / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16 x @ W^T on oneDNN, {args.threads} thread(s)")
    for d_in, d_out in SHAPES:
        (t256, g256), (t1024, g1024) = (microseconds_and_gflops(rows, d_in, d_out, args.repeats) for rows in (256, 1024))
        print(f"{d_in:5} -> {d_out:5}: 256 rows {t256:7.1f} us {g256:6.1f} GFLOP/s | 1,024 rows {t1024:7.1f} us "
              f"{g1024:6.1f} GFLOP/s | time per row, 256 / 1,024: {t256 * 4 / t1024:.2f}")


if __name__ == "__main__":
    main()
