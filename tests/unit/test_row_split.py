"""lorakit.ops.row_split: a product shape runs in parts of its rows only when the parts give the whole's bits and
are measurably faster; the choice is made once per shape; `linear` returns the same bits whichever way it goes."""

from __future__ import annotations

import time

import pytest
import torch

from lorakit.ops import matmul, row_split


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """No plans before or after a test; shapes tuned from their second call (the last test checks the default)."""
    row_split.reset()
    monkeypatch.setattr(row_split, "TUNE_AFTER_CALLS", 1)
    yield
    row_split.reset()


def _whole_in_halves(x, weight):
    """A stand-in for oneDNN's whole call whose bits the 2-part split reproduces (it is that split)."""
    return row_split._in_parts(x, weight, 2)


def _run(whole, calls=12, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(rows, 64, generator=g), torch.randn(48, 64, generator=g)
    outs = [row_split.linear(x, weight, whole) for _ in range(calls)]
    return x, weight, outs


def test_a_split_with_the_wholes_bits_that_is_faster_is_kept_and_the_whole_no_longer_runs():
    whole_calls = []

    def slow_whole(x, weight):
        whole_calls.append(1)
        time.sleep(0.004)
        return _whole_in_halves(x, weight)

    x, weight, outs = _run(slow_whole, calls=4 + 3 * len(row_split.CANDIDATE_PARTS) * 2)
    (parts,) = row_split.plans().values()
    assert parts in row_split.CANDIDATE_PARTS
    expected = _whole_in_halves(x, weight)
    assert all(torch.equal(out, expected) for out in outs)
    before = len(whole_calls)
    row_split.linear(x, weight, slow_whole)
    assert len(whole_calls) == before  # decided: the parts run, not the whole


def test_a_split_whose_bits_differ_is_never_taken():
    def other_bits(x, weight):  # faster than any split (no sleep) is irrelevant: the bits decide first
        return _whole_in_halves(x, weight) + 1.0

    x, weight, outs = _run(other_bits, calls=3)
    assert list(row_split.plans().values()) == [1]
    assert all(torch.equal(out, other_bits(x, weight)) for out in outs)


def test_a_split_that_is_not_faster_is_not_taken(monkeypatch):
    real = row_split._in_parts

    def slow_parts(x, weight, parts):
        time.sleep(0.004)
        return real(x, weight, parts)

    monkeypatch.setattr(row_split, "_in_parts", slow_parts)
    _run(_whole_in_halves, calls=4 + 3 * (len(row_split.CANDIDATE_PARTS) + 1))
    assert list(row_split.plans().values()) == [1]


def test_each_shape_and_thread_count_has_its_own_plan_and_the_cache_is_bounded(monkeypatch):
    _run(_whole_in_halves, calls=2, rows=512)
    _run(_whole_in_halves, calls=2, rows=640)
    assert len(row_split.plans()) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        _run(_whole_in_halves, calls=1, rows=512)
    finally:
        torch.set_num_threads(threads)
    assert len(row_split.plans()) == 3
    monkeypatch.setattr(row_split, "MAX_PLANS", 3)
    _run(_whole_in_halves, calls=2, rows=768)
    assert len(row_split.plans()) == 3  # past the bound: run whole, nothing remembered


def test_parts_keep_at_least_min_part_rows():
    _run(_whole_in_halves, calls=2, rows=2 * row_split.MIN_PART_ROWS)  # halves only; quarters would be too small
    (plan,) = row_split._PLANS.values()
    assert max(plan.candidates) <= 2


def test_only_large_contiguous_bf16_products_without_bias_or_autograd_apply():
    x, w = torch.randn(1024, 576).bfloat16(), torch.randn(576, 576).bfloat16()
    assert row_split.applies(x, w, None)
    assert not row_split.applies(x.float(), w.float(), None)  # fp32: torch.mm is not oneDNN's kernel there
    assert not row_split.applies(x, w, torch.zeros(576, dtype=torch.bfloat16))
    assert not row_split.applies(x[:, :288], w[:, :288], None)  # rows not contiguous
    assert not row_split.applies(x[:128], w, None)  # too few rows
    assert not row_split.applies(x, w[:16], None)  # a rank-16 product: too small
    logits_rows = row_split.MAX_OUTPUT_BYTES // (2 * 49152) + 1  # an LM head's logits chunk: too large an output
    assert not row_split.applies(torch.randn(logits_rows, 576).bfloat16(), torch.randn(49152, 576).bfloat16(), None)
    assert not row_split.applies(x.clone().requires_grad_(), w, None)  # torch.mm(out=) records no history
    with torch.no_grad():
        assert row_split.applies(x.clone().requires_grad_(), w, None)


@pytest.mark.skipif(matmul._ONEDNN is None or not matmul._ATEN_BF16_ON_ONEDNN,
                    reason="bf16 matmuls do not run on oneDNN here")
@pytest.mark.parametrize("rows, d_in, d_out", [(1024, 1536, 576), (1024, 576, 576), (1024, 576, 1536)])
def test_linear_gives_onednns_whole_bits_while_and_after_tuning(rows, d_in, d_out):
    x = torch.randn(4, rows // 4, d_in).bfloat16()
    weights = [torch.randn(d_out, d_in).bfloat16(), torch.randn(d_in, d_out).bfloat16().T]  # plain and transposed
    for weight in weights:
        expected = matmul._onednn_linear(x, weight)
        for _ in range(4 + 3 * (len(row_split.CANDIDATE_PARTS) + 1)):
            assert torch.equal(matmul.linear(x, weight), expected)
    assert len(row_split.plans()) == 2 and None not in row_split.plans().values()


def test_a_shape_is_tuned_only_once_it_recurs(monkeypatch):
    monkeypatch.setattr(row_split, "TUNE_AFTER_CALLS", 64)
    split_calls = []
    real = row_split._in_parts

    def counted(x, weight, parts):
        split_calls.append(parts)
        return real(x, weight, parts)

    def whole(x, weight):
        return real(x, weight, 2)

    monkeypatch.setattr(row_split, "_in_parts", counted)
    monkeypatch.setattr(row_split, "_parts_equal", lambda *args: split_calls.append("check") or True)
    x, weight, _ = _run(whole, calls=64)
    assert split_calls == [] and list(row_split.plans().values()) == [None]  # whole calls only, nothing tried
    row_split.linear(x, weight, whole)
    assert split_calls.count("check") == len(row_split.CANDIDATE_PARTS)  # the 65th call starts the tuning
