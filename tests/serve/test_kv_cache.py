"""The slot KV cache: rows of different lengths in one pass, chunked prompts, capacity growth, exact logits."""

from __future__ import annotations

import pytest
import torch

from lorakit.cache_argument import cache_argument
from lorakit.serve.kv_cache import RowWork, SlotKVCache, build_layout
from tests.serve.support import tiny_model


def test_layout_left_pads_and_masks_each_row_to_its_own_past():
    layout = build_layout([RowWork(row=2, past=3, tokens=[7]), RowWork(row=0, past=0, tokens=[5, 6, 8])],
                          pad_id=9, scratch_row=4, dtype=torch.float32, device=torch.device("cpu"))
    assert layout.input_ids.tolist() == [[9, 9, 7], [5, 6, 8]]
    assert layout.position_ids.tolist() == [[0, 0, 3], [0, 1, 2]]
    assert layout.write_rows.tolist() == [[4, 4, 2], [0, 0, 0]]  # padding writes into the scratch row
    assert layout.kv_len == 4 and layout.read_range is None and layout.read_rows.tolist() == [2, 0]
    visible = layout.attention_mask[:, 0] == 0
    assert visible[0, 2].tolist() == [True, True, True, True]  # the new token sees its 3 cached tokens and itself
    assert visible[1].tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    consecutive = build_layout([RowWork(1, 0, [1]), RowWork(2, 0, [1])], 0, 4, torch.float32, torch.device("cpu"))
    assert consecutive.read_range == (1, 3)


def test_capacity_doubles_keeps_entries_and_refuses_beyond_the_maximum():
    cache = SlotKVCache(rows=2, max_len=40, initial_capacity=8)
    cache.keys[0] = torch.arange(3 * 1 * 8 * 2, dtype=torch.float32).reshape(3, 1, 8, 2)
    cache.values[0] = cache.keys[0].clone()
    before = cache.keys[0].clone()
    cache.ensure_capacity(20)
    assert cache.capacity == 32 and cache.keys[0].shape == (3, 1, 32, 2)
    assert torch.equal(cache.keys[0][:, :, :8], before) and cache.keys[0][:, :, 8:].abs().sum() == 0
    cache.ensure_capacity(33)
    assert cache.capacity == 40
    with pytest.raises(ValueError, match="does not fit"):
        cache.ensure_capacity(41)


def run(model, cache, work):
    layout = build_layout(work, 0, cache.scratch_row, torch.float64, torch.device("cpu"))
    cache.ensure_capacity(layout.kv_len)
    cache.layout = layout
    with torch.inference_mode():
        out = model(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                    position_ids=layout.position_ids, use_cache=True, logits_to_keep=1,
                    **{cache_argument(model.forward): cache})
    cache.layout = None
    return out.logits[:, -1]


def test_chunked_prefill_and_decoding_give_the_logits_of_a_full_forward():
    """Two sequences in rows 3 and 0, prompts fed in uneven chunks alongside each other, then decoded together:
    each step's last logits equal a plain forward over the whole sequence so far."""
    model = tiny_model()
    cache = SlotKVCache(rows=4, max_len=64, initial_capacity=4)  # grows during the test
    torch.manual_seed(1)
    a, b = torch.randint(5, 200, (13,)).tolist(), torch.randint(5, 200, (6,)).tolist()

    def full(seq):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([seq])).logits[0, -1]

    logits = run(model, cache, [RowWork(3, 0, a[:5]), RowWork(0, 0, b[:2])])
    torch.testing.assert_close(logits[0], full(a[:5]))
    logits = run(model, cache, [RowWork(0, 2, b[2:]), RowWork(3, 5, a[5:13])])
    torch.testing.assert_close(logits[0], full(b))
    torch.testing.assert_close(logits[1], full(a))
    for step in range(3):
        a.append(7 + step)
        b.append(11 + step)
        logits = run(model, cache, [RowWork(0, len(b) - 1, b[-1:]), RowWork(3, len(a) - 1, a[-1:])])
        torch.testing.assert_close(logits[0], full(b))
        torch.testing.assert_close(logits[1], full(a))
    assert cache.capacity >= len(a)
