"""Training-step time of LoRA on the embedded SmolLM2-135M, with the base dense or in NF4 (QLoRA).

    PYTHONPATH=src python bench/qlora_step.py                   # every variant, 1 thread, 8 x 128 tokens
    PYTHONPATH=src python bench/qlora_step.py --threads 2 --steps 7 --variants lora qlora-bf16

One step = forward + backward + AdamW step of LoRA r=8 on all linear layers. Prints the median wall-clock and
CPU time of `--steps` timed steps after one warm-up step, their ratio to dense LoRA, and the bytes of the
linear weights. On a shared machine the CPU time (time.process_time: this process only) is the steadier of the
two. Timing is a benchmark, never a test (docs/qlora.md quotes its numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorakit import LoraConfig, get_peft_model, quantize_model
from lorakit.methods.quant import quantization_summary
from lorakit.models import load_model_and_tokenizer

# name -> (quantize_model options or None for dense, autocast to bf16)
VARIANTS = {
    "lora": (None, False),
    "lora-autocast-bf16": (None, True),
    "qlora-bf16": ({"compute_dtype": "bfloat16"}, False),
    "qlora-fp32": ({"compute_dtype": "float32"}, False),
    "qlora-autocast-bf16": ({"compute_dtype": "bfloat16"}, True),
}


def step_times(variant: str, steps: int, batch: int, length: int) -> list[tuple[float, float]]:
    quant, autocast = VARIANTS[variant]
    model, _ = load_model_and_tokenizer("smollm2", device="cpu")
    if quant is not None:
        quantize_model(model, **quant)
        print(f"  {quantization_summary(model)}")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (batch, length), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times[1:]  # the first step warms up allocators and kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"SmolLM2-135M, LoRA r=8 all-linear, batch {args.batch} x {args.length} tokens, {args.threads} thread(s)")
    medians = {}
    for variant in args.variants:
        print(f"{variant}:")
        times = step_times(variant, args.steps, args.batch, args.length)
        medians[variant] = tuple(statistics.median(t[i] for t in times) for i in (0, 1))
        print(f"  step: median {medians[variant][0]:.3f} s wall, {medians[variant][1]:.3f} s CPU "
              f"over {len(times)} steps")
    for reference in ("lora", "lora-autocast-bf16"):
        if reference in medians:
            print(f"ratio to {reference} (wall, CPU): " + ", ".join(
                f"{v} {w / medians[reference][0]:.2f}x {c / medians[reference][1]:.2f}x"
                for v, (w, c) in medians.items()))


if __name__ == "__main__":
    main()
