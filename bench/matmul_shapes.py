"""GFLOP/s of oneDNN's bf16 matmul for the shapes of a SmolLM2 LoRA training step, whole and in two halves of rows.

    PYTHONPATH=src python bench/matmul_shapes.py --threads 2
    PYTHONPATH=src python bench/matmul_shapes.py --threads 2 --rows 512,640,1024,1280,2048

`x @ W^T` for every projection (q, k/v, o, gate/up, down) and the rank-16 adapter products, on the kernel lorakit's
bf16 path runs (`torch.ops.mkldnn._linear_pointwise`, lorakit/ops/matmul.py), and the same product as two calls on
the halves of the rows written into one output (`torch.mm(out=)`, as lorakit/ops/row_split.py runs it), with
whether the halves give the whole call's bits. docs/performance.md quotes it for the speed ceiling (the best rate
at 1,024 rows), for why batch 1 (256 rows) runs below it, and for the shapes that run faster in halves
(optimisation 45). A measurement, not a test: the mean over --repeats calls after 10 warm-up calls.
"""

from __future__ import annotations

import argparse
import time

import torch

# (d_in, d_out) of SmolLM2-135M's projections and of a rank-16 adapter's A and B on them
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 16), (16, 576), (16, 1536), (1536, 16))


def seconds_per_call(run, repeats: int) -> float:
    for _ in range(10):
        run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def measure(rows: int, d_in: int, d_out: int, repeats: int) -> tuple[float, float, bool]:
    """(seconds whole, seconds in two halves, whether the halves give the whole's bits)."""
    op = torch.ops.mkldnn._linear_pointwise
    x, w = torch.randn(rows, d_in).bfloat16(), torch.randn(d_out, d_in).bfloat16()
    out = torch.empty(rows, d_out, dtype=torch.bfloat16)

    def halves():
        for x_part, out_part in zip(x.chunk(2), out.chunk(2)):
            torch.mm(x_part, w.t(), out=out_part)

    whole = seconds_per_call(lambda: op(x, w, None, "none", [], ""), repeats)
    in_halves = seconds_per_call(halves, repeats)
    return whole, in_halves, torch.equal(out, op(x, w, None, "none", [], ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rows", default="256,1024", help="comma-separated row counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row_counts = [int(r) for r in args.rows.split(",")]
    print(f"bf16 x @ W^T on oneDNN, {args.threads} thread(s): us and GFLOP/s whole | in two halves of the rows")
    for d_in, d_out in SHAPES:
        for rows in row_counts:
            whole, halves, same_bits = measure(rows, d_in, d_out, args.repeats)
            flops = 2 * rows * d_in * d_out / 1e9
            bits = "same bits" if same_bits else "other bits"
            print(f"{d_in:5} -> {d_out:5}, {rows:5} rows: {whole * 1e6:8.1f} us {flops / whole:7.1f} GFLOP/s | "
                  f"{halves * 1e6:8.1f} us {flops / halves:7.1f} GFLOP/s ({bits})")


if __name__ == "__main__":
    main()
