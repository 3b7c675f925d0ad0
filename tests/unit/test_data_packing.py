"""Data pipeline: collation and padding-free packing.

The packing proof: on a tiny Llama in fp32, a packed batch gives the same loss as the same examples
padded, and each example's logits inside a pack equal its logits alone. This relies on transformers
detecting packed sequences from position_ids (masking_utils.find_packed_sequence_indices), which it
only does with no attention_mask and no KV cache (use_cache=False).
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.train.data import DataConfig, build_datasets, make_collator
from lorakit.train.packing import DataCollator, pack_examples
from lorakit.train.templates import IGNORE_INDEX
from tests.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

PAD = 0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chat_rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}: " + "why " * (i % 4), "output": "answer " * (1 + i % 3)} for i in range(n)]


def text_rows(n: int) -> list[dict]:
    return [{"text": "lorem ipsum " * (1 + i % 5)} for i in range(n)]


def build(tmp_path, rows, **cfg_kwargs):
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), cutoff_len=128, **cfg_kwargs)
    train, _, info = build_datasets(cfg, tiny_tokenizer(), "CAUSAL_LM")
    return cfg, train, info


# ---- padding collator -----------------------------------------------------------------------------
def test_collator_pads_right_to_a_multiple_of_8():
    examples = [{"input_ids": [5] * 5, "labels": [-100, 5, 5, 5, 5]}, {"input_ids": [6] * 11, "labels": [6] * 11}]
    batch = DataCollator(pad_token_id=PAD, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5] * 5 + [PAD] * 11
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 11
    assert batch["labels"][0].tolist() == [-100, 5, 5, 5, 5] + [IGNORE_INDEX] * 11
    assert batch["labels"][1, 11:].eq(IGNORE_INDEX).all()
    assert DataCollator(PAD, pad_to_multiple_of=None)(examples)["input_ids"].shape == (2, 11)


def test_collator_classification_labels_and_make_collator_pad_id():
    batch = DataCollator(PAD)([{"input_ids": [7, 8], "labels": 2}, {"input_ids": [9], "labels": 0}])
    assert batch["labels"].tolist() == [2, 0] and batch["input_ids"].shape == (2, 8)
    tok = tiny_tokenizer()
    assert make_collator(DataConfig(path="x.json"), tok).pad_token_id == tok.pad_token_id
    tok.pad_token = None  # GPT-2 style: no pad token -> pad with EOS
    assert make_collator(DataConfig(path="x.json"), tok).pad_token_id == tok.eos_token_id


def test_collator_rejects_mixed_batches():
    with pytest.raises(ValueError, match="mixes packed rows"):
        DataCollator(PAD)([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "labels": [1], "position_ids": [0]}])


# ---- packing --------------------------------------------------------------------------------------
def test_pack_examples_is_complete_bounded_and_deterministic():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([9, 3, 7, 2, 5, 8, 1, 4])]
    rows = pack_examples(examples, max_len=10, seed=0)
    assert rows == pack_examples(examples, max_len=10, seed=0)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 39 and len(rows) == 4  # 39 tokens need >= 4 rows of 10
    for row in rows:
        starts = [p for p, pos in enumerate(row["position_ids"]) if pos == 0]
        assert all(row["labels"][p] == IGNORE_INDEX for p in starts)  # no label across a boundary
        ends = starts[1:] + [len(row["input_ids"])]
        lengths = sorted(e - s for s, e in zip(starts, ends))
        assert row["position_ids"] == [k for s, e in zip(starts, ends) for k in range(e - s)]
        assert all(len(set(row["input_ids"][s:e])) == 1 for s, e in zip(starts, ends))  # one example per segment
        assert lengths == sorted(len(examples[row["input_ids"][s]]["input_ids"]) for s in starts)
    with pytest.raises(ValueError, match="more than the pack length"):
        pack_examples(examples, max_len=5, seed=0)


def test_packing_rows_from_build_datasets(tmp_path):
    _, plain, info = build(tmp_path, chat_rows(12))
    _, packed, packed_info = build(tmp_path, chat_rows(12), packing=True)
    assert packed_info.num_train == info.num_train == 12 and packed_info.num_train_rows == len(packed) < 12
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(ex["input_ids"]) for ex in plain)
    batch = make_collator(DataConfig(path="x.json"), tiny_tokenizer())(packed[:2])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: padding-free
    assert batch["input_ids"].shape[1] % 8 == 0


def unpacked_and_packed_batches(examples):
    collate = DataCollator(PAD, pad_to_multiple_of=8)
    packed = pack_examples(examples, max_len=128, seed=3)
    assert len(packed) < len(examples)  # several examples do share rows
    return collate(examples), collate(packed)


@pytest.mark.parametrize("rows", [chat_rows, text_rows], ids=["chat", "text"])
def test_packed_loss_equals_unpacked_loss(tmp_path, rows):
    """text rows train every token after the first: a label across a boundary would change the loss."""
    _, examples, _ = build(tmp_path, rows(10))
    plain, packed = unpacked_and_packed_batches(examples)
    model = tiny_llama()
    with torch.no_grad():
        loss_plain = model(**plain).loss
        loss_packed = model(**packed, use_cache=False).loss
    assert torch.allclose(loss_packed, loss_plain, atol=1e-5, rtol=0), (loss_packed, loss_plain)
    trained = lambda b: int((b["labels"] != IGNORE_INDEX).sum())  # noqa: E731
    assert trained(plain) == trained(packed)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_in_a_pack_has_its_own_logits(tmp_path, make_model, attn):
    _, examples, _ = build(tmp_path, chat_rows(6))
    total = sum(len(ex["input_ids"]) for ex in examples[:4])
    [row] = pack_examples(examples[:4], max_len=total, seed=0)
    model = make_model(attn_implementation=attn)
    with torch.no_grad():
        packed_logits = model(input_ids=torch.tensor([row["input_ids"]]),
                              position_ids=torch.tensor([row["position_ids"]]), use_cache=False).logits[0]
        starts = [p for p, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
        assert len(starts) == 5
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
            assert torch.allclose(packed_logits[start:end], alone, atol=1e-5, rtol=0)


def test_packing_needs_use_cache_false():
    """Documents the trap: with a KV cache (config.use_cache=True, the default) transformers skips packed-sequence
    detection, so examples attend to each other. If this starts failing, transformers changed; revisit packing.py."""
    model = tiny_llama()
    ids, positions = torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:]).logits
        with_cache = model(input_ids=ids, position_ids=positions).logits[:, 4:]
        without_cache = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 4:]
    assert torch.allclose(without_cache, alone, atol=1e-5)
    assert not torch.allclose(with_cache, alone, atol=1e-3)
