"""Training step time of LoRA on nn.MultiheadAttention and on convolutions (Conv1d, grouped Conv2d, Conv3d),
lorakit and HuggingFace PEFT side by side.

    python bench/layer_types_step_time.py [--steps 6] [--r 8]

Two models: a stack of nn.TransformerEncoderLayer (width 256, 4 heads, batch 8 x 64 tokens) with LoRA on every
self_attn, and three convolution branches (1-D 8 x 64 x 1024, grouped 2-D 8 x 64 x 32 x 32, 3-D 4 x 16 x 8 x 32 x
32) with LoRA (and DoRA) on each. One step = forward, squared-output loss, backward, AdamW step. Reports the median
step time (this process's CPU time on one thread, runs interleaved, as bench/dora_step_time.py) and lorakit / PEFT.
PEFT adds a MultiheadAttention's out_proj update twice (docs/lora-layers.md); the cost is the same. Timings; never
run as a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import peft
import torch
from torch import nn

import lorakit


class Attention(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
                                    for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    @staticmethod
    def inputs():
        return (torch.randn(8, 64, 256),)


class Convolutions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(64, 64, 5, padding=2)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.conv3d = nn.Conv3d(16, 16, 3, padding=1)

    def forward(self, audio, image, video):
        return self.conv1d(audio).mean() + self.grouped(image).mean() + self.conv3d(video).mean()

    @staticmethod
    def inputs():
        return torch.randn(8, 64, 1024), torch.randn(8, 64, 32, 32), torch.randn(4, 16, 8, 32, 32)


CASES = {  # name -> (model class, config options)
    "MultiheadAttention LoRA": (Attention, dict(target_modules=["self_attn"])),
    "convolutions LoRA": (Convolutions, dict(target_modules=["conv1d", "grouped", "conv3d"])),
    "convolutions DoRA": (Convolutions, dict(target_modules=["conv1d", "grouped", "conv3d"], use_dora=True)),
}


def build(library, model_cls, options, r):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = library.get_peft_model(model_cls(), library.LoraConfig(r=r, lora_alpha=2 * r, **options)).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step(model, optimizer, inputs) -> float:
    start = time.process_time()
    model(*inputs).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"r={args.r}, fp32, 1 thread, CPU time, median of {args.steps} steps")
    for name, (model_cls, options) in CASES.items():
        inputs = model_cls.inputs()
        runs = {lib.__name__: build(lib, model_cls, options, args.r) for lib in (lorakit, peft)}
        times = {key: [] for key in runs}
        for i in range(args.steps + 1):  # one warm-up step
            for key, (model, optimizer) in runs.items():
                elapsed = step(model, optimizer, inputs)
                if i:
                    times[key].append(elapsed)
        ours, theirs = (statistics.median(times[k]) for k in ("lorakit", "peft"))
        print(f"{name:25} lorakit {ours * 1e3:8.1f} ms   PEFT {theirs * 1e3:8.1f} ms   lorakit / PEFT {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
