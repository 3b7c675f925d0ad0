"""Batching: a padding collator, and padding-free packing of several examples per row.

Packing puts examples one after the other in a row of at most `cutoff_len` tokens, with `position_ids`
restarting at 0 for each example and NO attention_mask. transformers (>= 4.5x, checked on 5.23,
`masking_utils.find_packed_sequence_indices`) then builds a block-diagonal causal mask: wherever
position_ids do not increase by exactly 1, a new sequence starts, and tokens attend only inside their
own sequence (sdpa and eager). RoPE / learned positions see the same positions as the example alone,
so each example's logits equal its unpacked logits.

Two conditions, both the trainer's job:
  * call the model with `use_cache=False`. With the default `config.use_cache=True` the model creates
    an empty KV cache, and transformers skips packed-sequence detection when a cache is present:
    examples would silently attend to each other.
  * pass no attention_mask (the collator below does not produce one for packed rows).

Across a boundary, the causal shift trains logits[t] against labels[t + 1]; the first label of every
example is -100 (templates.py), so the last token of one example never learns the next one's first.
Padding at the end of a packed row forms its own "sequence" (positions 0, 1, ...) with labels -100.
"""

from __future__ import annotations

import random

import torch

from lorakit.train.templates import IGNORE_INDEX


class DataCollator:
    """List of examples -> batch of tensors, right-padded.

    Unpacked examples ({"input_ids", "labels"}) -> input_ids, attention_mask, labels, each (B, T), with T
    the longest example rounded up to `pad_to_multiple_of`; labels -100 on padding. A classification
    label (an int) gives labels of shape (B,).
    Packed rows ({"input_ids", "labels", "position_ids"}) -> input_ids, labels, position_ids (B, T),
    no attention_mask (see the module docstring).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        if not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        packed = {"position_ids" in ex for ex in examples}
        if len(packed) > 1:
            raise ValueError("a batch mixes packed rows and plain examples; build both from the same config")
        length = self._padded_length(max(len(ex["input_ids"]) for ex in examples))
        input_ids = self._pad([ex["input_ids"] for ex in examples], length, self.pad_token_id)
        if isinstance(examples[0]["labels"], int):  # sequence classification
            labels = torch.tensor([ex["labels"] for ex in examples], dtype=torch.long)
        else:
            labels = self._pad([ex["labels"] for ex in examples], length, IGNORE_INDEX)
        if packed == {True}:
            positions = torch.stack([_padded_positions(ex["position_ids"], length) for ex in examples])
            return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        attention_mask = self._pad([[1] * len(ex["input_ids"]) for ex in examples], length, 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if not multiple else -(-longest // multiple) * multiple

    @staticmethod
    def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
        return torch.tensor([list(row) + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def _padded_positions(position_ids: list[int], length: int) -> torch.Tensor:
    """Padding positions restart at 0: the padding is a separate sequence nobody attends to."""
    return torch.tensor(list(position_ids) + list(range(length - len(position_ids))), dtype=torch.long)


def pack_examples(examples: list[dict], max_len: int, seed: int) -> list[dict]:
    """Greedy first-fit-decreasing packing into rows of at most `max_len` tokens. Deterministic given seed.

    Examples are shuffled with `seed` (ties in length keep that order), placed longest first into the
    first row with room, and the rows are shuffled again so that long and short rows are mixed.
    Each row: input_ids and labels (concatenated), position_ids (0..len-1 per example).
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    order.sort(key=lambda i: -len(examples[i]["input_ids"]))  # stable: equal lengths keep the shuffled order
    rows: list[list[int]] = []  # indices of the examples in each row
    room: list[int] = []
    for i in order:
        size = len(examples[i]["input_ids"])
        if size > max_len:
            raise ValueError(f"example {i} has {size} tokens, more than the pack length {max_len}; truncate first")
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([]), room.append(max_len)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= size
    rng.shuffle(rows)
    return [_concat([examples[i] for i in row]) for row in rows]


def _concat(examples: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])  # first label never crosses a boundary
        row["position_ids"] += list(range(len(ex["input_ids"])))
    return row
