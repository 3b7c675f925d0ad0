"""Activation memory kept for the backward: LoRA vs LoRA-FA on a model of SmolLM2-135M's shape.

    python bench/lora_fa_memory.py [--layers 30] [--batch 4] [--seq 256] [--r 16]

Counts the bytes of every tensor autograd saves during one forward (torch.autograd.graph.saved_tensors_hooks),
each storage once, parameters left out: what the backward must keep in memory. LoRA on every linear layer keeps
each layer's input x (d_in values per token) for A's gradient; LoRA-FA (A frozen) keeps A x (r values per token)
instead. Also reported: the LoRA branches alone, measured the same way on the adapter layers only.
Runs on CPU in about a minute; results are exact byte counts, not timings.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lorakit  # noqa: E402
from common import smollm2_shaped  # noqa: E402
from lorakit.methods.lora.layer import LoraLayer  # noqa: E402


def saved_bytes(model, ids, only=None) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in model(ids); `only`: count only tensors
    saved while inside these modules."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    inside = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and (only is None or inside[0]):
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    handles = []
    for module in only or []:
        handles.append(module.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1)))
        handles.append(module.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    for handle in handles:
        handle.remove()
    return sum(storages.values())


def measure(args, lora_fa: bool) -> dict:
    config = lorakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
    model = lorakit.get_peft_model(smollm2_shaped(args.layers, args.vocab), config).train()
    if lora_fa:
        lorakit.enable_lora_fa(model)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return {"trainable": model.get_nb_trainable_parameters()[0],
            "total": saved_bytes(model, ids), "lora_layers": saved_bytes(model, ids, only=layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    tokens = args.batch * args.seq
    rows = {"LoRA": measure(args, lora_fa=False), "LoRA-FA": measure(args, lora_fa=True)}
    print(f"SmolLM2-135M shape, {args.layers} blocks, all-linear r={args.r}, {args.batch}x{args.seq} tokens, fp32")
    print(f"{'':10}{'trainable':>12}{'saved, whole model':>22}{'saved in LoRA layers':>24}{'per token':>12}")
    for name, row in rows.items():
        print(f"{name:10}{row['trainable']:>12,d}{row['total'] / 2**20:>19.1f} MB{row['lora_layers'] / 2**20:>21.1f} MB"
              f"{row['lora_layers'] / tokens / 1024:>9.1f} KB")
    lora, fa = rows["LoRA"], rows["LoRA-FA"]
    print(f"LoRA-FA / LoRA: trainable {fa['trainable'] / lora['trainable']:.2f}x, whole model "
          f"{fa['total'] / lora['total']:.2f}x, LoRA layers {fa['lora_layers'] / lora['lora_layers']:.2f}x")


if __name__ == "__main__":
    main()
