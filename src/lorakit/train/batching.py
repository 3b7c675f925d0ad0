"""Which examples go into which optimizer step, on which process, in which micro-batch.

The order of an epoch depends only on (seed, epoch), so every process computes the same global batches
and a resumed run continues exactly where it stopped. A global batch of `batch_size *
gradient_accumulation_steps * world_size` examples is cut into one contiguous share per process, and each
share into micro-batches of at most `batch_size`.
"""

from __future__ import annotations

import math

import torch

from lorakit.train.templates import IGNORE_INDEX


def epoch_batches(num_rows: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each global batch of one epoch; the last batch may be smaller."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + global_batch] for i in range(0, num_rows, global_batch)]


def process_share(indices: list[int], rank: int, world_size: int) -> list[int]:
    per_rank = math.ceil(len(indices) / world_size)
    return indices[rank * per_rank:(rank + 1) * per_rank]


def micro_batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def trained_tokens(example: dict) -> int:
    """Loss terms one example contributes: labels after the causal shift, or 1 for a class label."""
    labels = example["labels"]
    if isinstance(labels, int):
        return 1
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return math.ceil(num_rows / global_batch)
