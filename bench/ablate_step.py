"""What each training-step optimisation gains: the `lorakit bench train` workload with one optimisation off at a
time, in one process, the variants taking turns step after step.

    PYTHONPATH=src python bench/ablate_step.py --setting fp32 --batch 1 --seq 256 --rounds 4
    PYTHONPATH=src python bench/ablate_step.py --setting default

Variants: all on; no oneDNN (LORAKIT_MATMUL=aten: PyTorch's MKL/aten matmuls); no row split (oneDNN's bf16
products always whole, ops/row_split.py); no fused LoRA function (the layer's general module path); no chunked
LM-head loss (full logits, then F.cross_entropy); no fused modules (the
model's own RMSNorm and MLP forwards, ops/fused_modules.py); no CPU attention (PyTorch's SDPA instead of
lorakit's kernel, ops/attention.py; the default setting only: the others run SDPA anyway). Every variant runs the
same model and batch (the optimizer is not stepped, so the weights stay the same); the figure is the median CPU
time of this process per step (forward + loss + backward) over --rounds rounds. The glibc malloc setting
(lorakit/train/runtime.py) is process-wide and cannot be switched per step: `lorakit bench train` measures it
(lorakit runs apply it). docs/performance.md quotes the output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from unittest import mock

import torch

from lorakit.bench.workload import SETTINGS, TrainingStep, random_batch


@contextlib.contextmanager
def no_onednn():
    with mock.patch.dict(os.environ, {"LORAKIT_MATMUL": "aten"}):
        yield


@contextlib.contextmanager
def no_row_split():
    from lorakit.ops import row_split

    with mock.patch.object(row_split, "ENABLED", False):
        yield


@contextlib.contextmanager
def no_fused():
    from lorakit.methods.lora.layer import LoraLinear

    def general_path(self, x, *args, **kwargs):  # the adapter layers' general path (base, then each adapter's term)
        return super(LoraLinear, self).forward(x, *args, **kwargs)

    with mock.patch.object(LoraLinear, "forward", general_path):
        yield


@contextlib.contextmanager
def no_chunked_loss():
    import lorakit.eval.metrics as metrics

    with mock.patch.object(metrics, "plain_output_head", lambda model: None):
        yield


class NoFusedModules:
    """The model's own RMSNorm and MLP forwards for the step (ops/fused_modules.py), swapped back after it."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        from lorakit.ops.fused_modules import restore_modules

        restore_modules(self.model)

    def __exit__(self, *exc):
        from lorakit.ops.fused_modules import use_fused_modules

        use_fused_modules(self.model)


class NoCpuAttention:
    """PyTorch's SDPA for the step instead of lorakit's attention kernel (ops/attention.py), switched back after it."""

    def __init__(self, model) -> None:
        self.model = model
        self.was_on = False

    def __enter__(self):
        from lorakit.ops.attention import IMPLEMENTATION, restore_attention

        self.was_on = self.model.get_base_model().config._attn_implementation == IMPLEMENTATION
        restore_attention(self.model)

    def __exit__(self, *exc):
        from lorakit.ops.attention import use_cpu_attention

        if self.was_on:
            use_cpu_attention(self.model)


VARIANTS = {"all on": lambda run: contextlib.nullcontext(), "no oneDNN": lambda run: no_onednn(),
            "no row split": lambda run: no_row_split(),
            "no fused LoRA": lambda run: no_fused(), "no chunked loss": lambda run: no_chunked_loss(),
            "no fused modules": lambda run: NoFusedModules(run.model),
            "no CPU attention": lambda run: NoCpuAttention(run.model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="fp32", choices=[s for s in SETTINGS])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = TrainingStep("lorakit", args.setting, args.model, 16, 32, 2e-4, None)
    batch = random_batch(0, args.batch, args.seq, run.vocab, 0)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds + 1):  # round 0 warms every variant up
        for name, switch in VARIANTS.items():
            with switch(run):
                started = time.process_time()
                loss = run.loss(batch)
                loss.backward()
                elapsed = time.process_time() - started
            run.optimizer.zero_grad(set_to_none=True)
            if round_:
                times[name].append(elapsed)
    base = statistics.median(times["all on"])
    print(f"lorakit {args.setting}: {args.batch} x {args.seq} tokens, {args.threads} thread(s), median CPU seconds "
          f"per forward+backward over {args.rounds} rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:18} {median:6.3f} s  {args.batch * args.seq / median:7.1f} tokens/CPU-s  x{median / base:.2f}")


if __name__ == "__main__":
    main()
