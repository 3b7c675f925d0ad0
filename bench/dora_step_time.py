"""Training step time of DoRA vs LoRA on SmolLM2-135M-sized layers, lorakit and HuggingFace PEFT side by side.

    python bench/dora_step_time.py [--layers 2] [--batch 4] [--seq 128] [--r 16] [--steps 8]

One step = forward, loss, backward, AdamW step, over a model of SmolLM2-135M's layer sizes (fewer blocks and a
small vocabulary by default, so the adapted layers dominate) with LoRA on every linear layer. Reports the median
step time of each and the DoRA / LoRA ratios. Time is this process's CPU time on one thread (--threads 1, the
default): on a machine shared with other work, wall-clock time mostly measures the others. The runs are
interleaved (one step of each in turn) so that what remains of the noise hits them alike. Timings; never run as
a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lorakit  # noqa: E402
from common import smollm2_shaped  # noqa: E402
from lorakit.methods.lora.dora import dense_row_norms, row_norms  # noqa: E402

# (d_out, d_in) of SmolLM2-135M's linear layers: q/o, k/v, gate/up, down
LAYER_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def build(library: str, use_dora: bool, args):
    model = smollm2_shaped(args.layers, args.vocab)
    options = dict(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=use_dora)
    if library == "peft":
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, peft.LoraConfig(**options))
    else:
        model = lorakit.get_peft_model(model, lorakit.LoraConfig(**options))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step(model, optimizer, ids, clock) -> float:
    start = clock()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads; above 1, wall-clock time is used")
    parser.add_argument("--no-peft", action="store_true", help="lorakit only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    libraries = ["lorakit"] + ([] if args.no_peft else ["peft"])
    runs = {(lib, dora): build(lib, dora, args) for lib in libraries for dora in (False, True)}
    times = {key: [] for key in runs}
    for i in range(args.steps + 2):  # two warm-up steps
        for key, (model, optimizer) in runs.items():
            elapsed = step(model, optimizer, ids, clock)
            if i >= 2:
                times[key].append(elapsed)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"SmolLM2-135M layer sizes, {args.layers} blocks, all-linear r={args.r}, {args.batch}x{args.seq} tokens, "
          f"fp32, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time, median of {args.steps} steps")
    for lib in libraries:
        lora, dora = median[(lib, False)], median[(lib, True)]
        print(f"{lib:8} LoRA {lora * 1000:7.1f} ms   DoRA {dora * 1000:7.1f} ms   DoRA / LoRA {dora / lora:.2f}x")
    if not args.no_peft:
        print(f"lorakit DoRA / PEFT DoRA {median[('lorakit', True)] / median[('peft', True)]:.2f}x")
    norm_times(args.r, clock)


def norm_times(r: int, clock, repeats: int = 20) -> None:
    """The row norm ||W + s B A|| alone, per layer shape: factored (r-sized products) vs forming W + s B A."""
    print(f"row norm of one layer, r={r}, median of {repeats}:")
    for d_out, d_in in LAYER_SHAPES:
        w, a, b = torch.randn(d_out, d_in), torch.randn(r, d_in), torch.randn(d_out, r)
        result = {}
        for name, fn in (("factored", row_norms), ("dense", torch.no_grad()(dense_row_norms))):
            samples = []
            for _ in range(repeats):
                start = clock()
                fn(w, a, b, 2.0)
                samples.append(clock() - start)
            result[name] = statistics.median(samples)
        print(f"  {d_out:>5} x {d_in:<5} factored {result['factored'] * 1e3:6.3f} ms   dense {result['dense'] * 1e3:6.3f} ms"
              f"   ({result['dense'] / result['factored']:.1f}x)")


if __name__ == "__main__":
    main()
