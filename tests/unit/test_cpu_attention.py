"""lorakit's CPU attention kernel (ops/csrc/causal_attention.cpp through ops/attention.py): the same attention
as fp32 SDPA to bf16 rounding, forward and backward, for grouped and plain heads, short and block-split lengths,
with the kernel's forward and with PyTorch's flash forward (what CPUs with AMX run) before the kernel's backward;
in fp32 the same as SDPA to fp32 rounding, on the kernel's forward everywhere; used only where it computes what
SDPA would (everything else goes to SDPA unchanged); switched in by the trainer's CPU runs (bf16 and fp32) and
given back at the end; a failed build leaves SDPA and no file behind."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops import attention, cpu_extension
from lorakit.ops.attention import (
    IMPLEMENTATION,
    attention_forward,
    causal_attention,
    kernel_applies,
    restore_attention,
    use_cpu_attention,
)
from lorakit.ops.cpu_extension import KernelBuildError, kernels_available, load_cpu_extension
from lorakit.train.loop import run_training
from tests.tiny import tiny_llama
from tests.train_fixtures import tiny_run_config, train_losses

pytestmark = pytest.mark.skipif(not kernels_available(), reason="lorakit's CPU kernels cannot be built here")


@pytest.fixture(autouse=True)
def two_threads():
    """The kernel takes a call only with at least one work item per thread (ops/attention.py: enough_work): the
    tiny shapes here have a few items, as many as 2 threads need, whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["kernel forward", "flash forward"])
def forward(request, monkeypatch):
    """Both forwards the kernel's backward follows, whatever this machine has: the kernel's, and PyTorch's flash
    kernel (ops/attention.py: _forward, taken on CPUs with AMX)."""
    monkeypatch.setattr(attention, "cpu_has_amx", lambda: request.param == "flash forward")
    return request.param


def _inputs(batch, heads, kv_heads, length, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    grad = torch.randn(batch, heads, length, dim, generator=g)
    return q, k, v, grad


def _reference(q, k, v, grad, scale=None):
    """fp32 SDPA (causal, grouped-query) on the bf16-rounded inputs: output and input gradients."""
    q, k, v = (t.bfloat16().float().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
    out.backward(grad.bfloat16().float())
    return out.detach(), q.grad, k.grad, v.grad


def _kernel(q, k, v, grad, scale=None):
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v, scale)
    out.backward(grad.bfloat16())
    return out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()


def _assert_close_to_bf16(actual, expected, name):
    """Within what bf16 scores and probabilities allow: 3% of the tensor's range, and aligned (cosine > 0.999)."""
    error = (actual - expected).abs().max().item()
    span = expected.abs().max().item()
    cosine = F.cosine_similarity(actual.flatten(), expected.flatten(), dim=0).item()
    assert error <= 0.03 * span and cosine > 0.999, f"{name}: max error {error:.4g} of {span:.4g}, cosine {cosine:.6f}"


@pytest.mark.parametrize("shape", [
    (2, 4, 2, 37, 16),    # grouped heads, a length that is no multiple of the vector width
    (3, 2, 2, 5, 32),     # one query head per kv head
    (8, 6, 2, 64, 64),    # enough groups for the stacked-heads matmul
    (8, 4, 2, 200, 16),   # stacked heads in two row blocks (72 and 128 rows)
    (1, 3, 1, 300, 8),    # longer than one row block: blocks of 256 and 44 rows, three heads on one kv head
])
def test_kernel_matches_fp32_sdpa_forward_and_backward(shape, forward):
    q, k, v, grad = _inputs(*shape)
    for actual, expected, name in zip(_kernel(q, k, v, grad), _reference(q, k, v, grad), ("out", "dq", "dk", "dv")):
        _assert_close_to_bf16(actual, expected, name)


def _fp32_kernel_and_reference(q, k, v, grad, ranges=None, mask=None):
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*ours, key_ranges=ranges)
    out.backward(grad)
    theirs = [t.double().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*theirs, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    reference.backward(grad.double())
    return [out.detach()] + [t.grad for t in ours], [reference.detach()] + [t.grad for t in theirs]


@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 16), (3, 2, 2, 5, 32), (8, 6, 2, 64, 64), (8, 4, 2, 200, 16),
                                   (1, 3, 1, 300, 8)])
def test_fp32_kernel_matches_sdpa_to_fp32_rounding(shape, forward):
    """The exact training path: fp32 scores, probabilities and products; as close to fp64 attention as PyTorch's
    own fp32 SDPA is (a few ulp of the tensor's range). On CPUs with AMX too the forward is the kernel's (PyTorch's
    flash forward is taken for bf16 only)."""
    q, k, v, grad = _inputs(*shape)
    ours, reference = _fp32_kernel_and_reference(q, k, v, grad)
    sdpa = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
    sdpa_out = F.scaled_dot_product_attention(*sdpa, is_causal=True, enable_gqa=True)
    sdpa_out.backward(grad)
    for name, actual, expected, theirs in zip(("out", "dq", "dk", "dv"), ours, reference,
                                              [sdpa_out.detach()] + [t.grad for t in sdpa]):
        assert actual.dtype == torch.float32
        span = expected.abs().max().item()
        error, sdpa_error = ((actual.double() - expected).abs().max().item(),
                             (theirs.double() - expected).abs().max().item())
        assert error <= max(4 * sdpa_error, 1e-6 * span), f"{name}: {error:.3g} against SDPA's {sdpa_error:.3g}"
    out, lse = attention._forward(q, k, v, None, 0.25)  # with or without AMX (the `forward` fixture)
    kernel_out, kernel_lse = torch.ops.lorakit.causal_attention_fwd(q, k, v, None, 0.25)
    assert torch.equal(out, kernel_out) and torch.equal(lse, kernel_lse)


def test_fp32_kernel_with_key_ranges_and_strided_inputs():
    """Right padding and packed sequences (key ranges), and q, k, v as transformers lays them out, in fp32."""
    q, k, v, grad = _inputs(3, 4, 2, 20, 16, seed=4)
    mask = torch.cat([_causal_mask(1, 20, lengths=[13]), _packed_mask(20, [0, 7, 15]), _packed_mask(20, [0])])
    ranges = attention.mask_key_ranges(mask, 3, 20)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    ours, reference = _fp32_kernel_and_reference(*strided, grad, ranges=ranges, mask=mask)
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), ours, reference):
        assert torch.allclose(actual.double(), expected, atol=1e-5, rtol=1e-5), name


def test_kernel_uses_the_given_scale_and_one_thread_gives_the_same_attention(forward):
    q, k, v, grad = _inputs(2, 4, 2, 40, 16, seed=1)
    for actual, expected, name in zip(_kernel(q, k, v, grad, 0.3), _reference(q, k, v, grad, 0.3),
                                      ("out", "dq", "dk", "dv")):
        _assert_close_to_bf16(actual, expected, name)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _kernel(q, k, v, grad)
    finally:
        torch.set_num_threads(threads)
    for actual, expected, name in zip(single, _kernel(q, k, v, grad), ("out", "dq", "dk", "dv")):
        assert torch.allclose(actual, expected, atol=1e-2, rtol=1e-2), name  # dK, dV: another summation order


def test_kernel_gives_the_same_result_on_every_run(forward):
    """The (head, row block) items are dealt into one list per thread by their cost, the same way on every run:
    dK and dV, summed per list in fp32, come out the same bit for bit. Block-split length, uneven item costs."""
    q, k, v, grad = _inputs(1, 6, 2, 600, 16, seed=3)
    first = _kernel(q, k, v, grad)
    for again in (_kernel(q, k, v, grad), _kernel(q, k, v, grad)):
        for actual, expected, name in zip(again, first, ("out", "dq", "dk", "dv")):
            assert torch.equal(actual, expected), name
    for actual, expected, name in zip(first, _reference(q, k, v, grad), ("out", "dq", "dk", "dv")):
        _assert_close_to_bf16(actual, expected, name)


def test_kernel_reads_strided_inputs(forward):
    """q, k, v as transformers makes them: (B, H, L, D) views of (B, L, H, D) memory."""
    q, k, v, grad = _inputs(2, 4, 2, 24, 16, seed=2)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    for actual, expected in zip(_kernel(*strided, grad), _kernel(q, k, v, grad)):
        assert torch.equal(actual, expected)


class _Module(torch.nn.Module):
    is_causal = True


def test_kernel_applies_only_where_sdpa_would_compute_plain_causal_attention():
    q, k, v, _ = (t.bfloat16() for t in _inputs(1, 4, 2, 8, 16))
    module = _Module()
    assert kernel_applies(module, q, k, v, None, 0.0, None, {})
    long_q, long_k, long_v, _ = _inputs(1, 4, 2, attention.FP32_MIN_LENGTH, 16)
    assert kernel_applies(module, long_q, long_k, long_v, None, 0.0, None, {})  # the exact fp32 path
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    refused = {
        "a mask (padding, packing)": (q, k, v, mask, 0.0, None, {}),
        "dropout": (q, k, v, None, 0.1, None, {}),
        "not causal": (q, k, v, None, 0.0, False, {}),
        "fp16": (q.half(), k.half(), v.half(), None, 0.0, None, {}),
        "mixed dtypes": (q.float(), k, v, None, 0.0, None, {}),
        "fp32 shorter than FP32_MIN_LENGTH (SDPA the faster)": (q.float(), k.float(), v.float(), None, 0.0, None, {}),
        "one query (decoding)": (q[:, :, :1], k, v, None, 0.0, None, {}),
        "more keys than queries (cache)": (q[:, :, :4], k, v, None, 0.0, None, {}),
        "sliding window": (q, k, v, None, 0.0, None, {"sliding_window": 4}),
        "soft-capping": (q, k, v, None, 0.0, None, {"softcap": 30.0}),
        "attention weights asked for": (q, k, v, None, 0.0, None, {"output_attentions": True}),
    }
    for reason, args in refused.items():
        assert not kernel_applies(module, *args), reason


def _causal_mask(batch: int, length: int, first_real=None, lengths=None) -> torch.Tensor:
    """transformers' boolean SDPA mask (B, 1, L, L), True = attend: causal, with left padding (keys before
    first_real[b] masked) or right padding (keys from lengths[b] on masked)."""
    positions = torch.arange(length)
    mask = (positions[:, None] >= positions[None, :]).expand(batch, 1, length, length).clone()
    for b in range(batch):
        if first_real is not None:
            mask[b, :, :, :first_real[b]] = False
        if lengths is not None:
            mask[b, :, :, lengths[b]:] = False
    return mask


def test_pytorch_kernel_kept_where_it_is_the_faster_one(monkeypatch):
    q, k, v, _ = (t.bfloat16() for t in _inputs(1, 4, 2, 8, 16))
    module = _Module()
    assert kernel_applies(module, q, k, v, None, 0.0, None, {})
    monkeypatch.setattr(attention, "cpu_has_amx", lambda: True)  # AMX: the kernel's backward is still the faster one
    assert kernel_applies(module, q, k, v, None, 0.0, None, {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # 1 row x 4 heads x 1 block: 4 items for 8 threads
    assert not kernel_applies(module, q, k, v, None, 0.0, None, {})


def test_on_amx_the_forward_is_pytorchs_flash_kernel_unless_there_are_key_ranges(monkeypatch):
    """CPUs with AMX: PyTorch's flash forward (output and log-sum-exp bit for bit its own), then the kernel's
    backward; with key ranges (padding, packing) the kernel's forward, as without AMX."""
    q, k, v, _ = (t.bfloat16() for t in _inputs(2, 4, 2, 24, 16, seed=5))
    flash_out, flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.25)
    kernel_out, kernel_lse = torch.ops.lorakit.causal_attention_fwd(q, k, v, None, 0.25)
    assert not torch.equal(flash_out, kernel_out)  # fp32 against bf16 scores: the two forwards can be told apart
    monkeypatch.setattr(attention, "cpu_has_amx", lambda: False)
    out, lse = attention._forward(q, k, v, None, 0.25)
    assert torch.equal(out, kernel_out) and torch.equal(lse, kernel_lse)
    monkeypatch.setattr(attention, "cpu_has_amx", lambda: True)
    out, lse = attention._forward(q, k, v, None, 0.25)
    assert torch.equal(out, flash_out) and torch.equal(lse, flash_lse) and lse.is_contiguous()
    ranges = attention.mask_key_ranges(_causal_mask(2, 24, lengths=[24, 10]), 2, 24)
    out, lse = attention._forward(q, k, v, ranges, 0.25)
    expected_out, expected_lse = torch.ops.lorakit.causal_attention_fwd(q, k, v, ranges, 0.25)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_attention_forward_falls_back_to_sdpa_unchanged():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, _ = (t.bfloat16() for t in _inputs(2, 4, 2, 12, 16, seed=3))
    module = _Module()
    module.num_key_value_groups = 2
    for mask in (_causal_mask(2, 12, first_real=[0, 3]),  # left padding
                 _causal_mask(2, 12) & torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)).gt(0.2)):
        assert attention.mask_key_ranges(mask, 2, 12) is None
        ours, _ = attention_forward(module, q, k, v, mask)
        theirs, _ = sdpa_attention_forward(module, q, k, v, mask)
        assert torch.equal(ours, theirs)
    kernel, _ = attention_forward(module, q, k, v, None)  # no mask: the kernel, same layout as SDPA's output
    reference, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None)
    assert kernel.shape == reference.shape == (2, 12, 4, 16)
    _assert_close_to_bf16(kernel.float(), reference, "out")


def _packed_mask(length: int, starts) -> torch.Tensor:
    """One row of sequences packed one after the other (each starting at one of `starts`): block-diagonal causal."""
    positions = torch.arange(length)
    sequence = torch.zeros(length, dtype=torch.long)
    for start in starts[1:]:
        sequence[start:] += 1
    return ((positions[:, None] >= positions[None, :]) & (sequence[:, None] == sequence[None, :]))[None, None]


@pytest.mark.parametrize("case", ["right padding", "packed sequences"])
def test_masks_with_one_run_of_keys_per_query_run_on_the_kernel_as_sdpa_computes_them(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, grad = _inputs(3, 4, 2, 20, 16, seed=4)
    if case == "right padding":
        mask = _causal_mask(3, 20, lengths=[20, 13, 1])
        expected_ranges = {(1, 5): (0, 6), (1, 17): (0, 13), (2, 19): (0, 1)}  # padded queries see the real keys
    else:
        mask = torch.cat([_packed_mask(20, [0, 7, 15]), _packed_mask(20, [0, 1, 2, 10]), _packed_mask(20, [0])])
        expected_ranges = {(0, 6): (0, 7), (0, 7): (7, 8), (0, 19): (15, 20), (1, 1): (1, 2), (1, 12): (10, 13)}
    ranges = attention.mask_key_ranges(mask, 3, 20)
    for (b, i), bounds in expected_ranges.items():
        assert tuple(ranges[b, i].tolist()) == bounds
    module = _Module()
    module.num_key_value_groups = 2
    ours = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out, _ = attention_forward(module, *ours, mask)
    out.backward(grad.bfloat16().transpose(1, 2))
    theirs = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
    reference, _ = sdpa_attention_forward(module, *theirs, mask)
    reference.backward(grad.bfloat16().float().transpose(1, 2))
    _assert_close_to_bf16(out.detach().float(), reference.detach(), "out")
    for name, a, b in zip(("dq", "dk", "dv"), ours, theirs):
        _assert_close_to_bf16(a.grad.float(), b.grad, name)


def test_one_mask_for_all_rows_and_bad_key_ranges():
    ranges = attention.mask_key_ranges(_causal_mask(1, 20), 3, 20)  # (1, 1, L, L) shared by the batch
    assert ranges.shape == (3, 20, 2) and ranges[2, 9].tolist() == [0, 10]
    q, k, v, _ = (t.bfloat16() for t in _inputs(1, 2, 1, 4, 8))
    for bad in ([[0, 1], [0, 3], [0, 3], [0, 4]], [[0, 1], [1, 1], [0, 3], [0, 4]]):  # a future key; an empty run
        with pytest.raises(RuntimeError, match="key range must be non-empty and within"):
            causal_attention(q, k, v, key_ranges=torch.tensor([bad]))


def test_model_switched_to_the_kernel_computes_the_same_loss_and_gradients_and_is_given_back(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **k: calls.append(a[-1]) or causal_attention(*a, **k))
    model = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    for param in model.parameters():
        param.requires_grad_(True)
    ids = torch.randint(5, 200, (2, 40), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    sdpa_loss, sdpa_grads = loss_and_grads()
    assert use_cpu_attention(model) and model.config._attn_implementation == IMPLEMENTATION
    assert not use_cpu_attention(model)  # once
    kernel_loss, kernel_grads = loss_and_grads()
    assert len(calls) == 2 and calls[0] is None  # two layers, no mask
    assert abs(kernel_loss - sdpa_loss) < 2e-2
    for name, grad in sdpa_grads.items():
        relative = ((kernel_grads[name] - grad).norm() / grad.norm()).item()
        assert relative < 3e-2, f"{name}: relative gradient difference {relative:.3g}"
    right, left = torch.ones_like(ids), torch.ones_like(ids)
    right[1, 30:] = 0
    left[1, :10] = 0
    with torch.no_grad():
        calls.clear()
        kernel_right = model(input_ids=ids, attention_mask=right).logits.float()  # right padding: the kernel
        assert len(calls) == 2 and calls[0][1, 39].tolist() == [0, 30]  # both layers; a padded query: the real keys
        kernel_left = model(input_ids=ids, attention_mask=left).logits  # left padding: SDPA inside the kernel's name
        assert len(calls) == 2
        restore_attention(model)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(kernel_left, model(input_ids=ids, attention_mask=left).logits)
        sdpa_right = model(input_ids=ids, attention_mask=right).logits.float()
    _assert_close_to_bf16(kernel_right, sdpa_right, "logits with right padding")


def test_packed_rows_run_on_the_kernel_with_each_sequence_on_its_own(monkeypatch):
    """The trainer's packing: position_ids restarting per example, no attention_mask; transformers builds the
    block-diagonal mask, the kernel takes it; the logits are SDPA's."""
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **k: calls.append(a[-1]) or causal_attention(*a, **k))
    model = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    with torch.no_grad():
        reference = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits.float()
        assert use_cpu_attention(model)
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits.float()
        restore_attention(model)
    assert len(calls) == 2 and calls[0][0, 12].tolist() == [10, 13]  # the second example's third token
    _assert_close_to_bf16(packed, reference, "logits of packed rows")


def test_models_not_on_sdpa_are_left_alone():
    model = tiny_llama(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert not use_cpu_attention(model) and model.config._attn_implementation == "eager"
    restore_attention(model)  # nothing to give back
    assert model.config._attn_implementation == "eager"


def test_bf16_training_runs_on_the_kernel_and_follows_the_sdpa_run(tmp_path):
    kernel = run_training(tiny_run_config(tmp_path, "train.bf16=true", output="kernel"), show_progress=False)
    sdpa = run_training(tiny_run_config(tmp_path, "train.bf16=true", "train.cpu_attention=false", output="sdpa"),
                        show_progress=False)
    assert kernel.model.get_base_model().config._attn_implementation == "sdpa"  # given back at the end
    ours, theirs = train_losses(kernel.output_dir), train_losses(sdpa.output_dir)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for step, loss in theirs.items():
        assert abs(ours[step] - loss) < 0.02 * abs(loss), (step, ours[step], loss)


def test_fp32_training_runs_on_the_kernel_and_follows_the_sdpa_run(tmp_path, monkeypatch):
    """The exact fp32 path (train.bf16=false) takes the kernel too: the same losses as SDPA's to fp32 rounding."""
    monkeypatch.setattr(attention, "FP32_MIN_LENGTH", 1)  # the tiny run's short rows (the rule is about speed)
    calls = []
    monkeypatch.setattr(attention, "causal_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or causal_attention(*a, **k))
    kernel = run_training(tiny_run_config(tmp_path, "train.bf16=false", output="kernel"), show_progress=False)
    assert calls and set(calls) == {torch.float32}
    calls.clear()
    sdpa = run_training(tiny_run_config(tmp_path, "train.bf16=false", "train.cpu_attention=false", output="sdpa"),
                        show_progress=False)
    assert not calls
    ours, theirs = train_losses(kernel.output_dir), train_losses(sdpa.output_dir)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for step, loss in theirs.items():
        assert abs(ours[step] - loss) < 1e-4 * abs(loss), (step, ours[step], loss)


def test_a_failed_build_raises_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_extension, "CSRC", csrc)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KernelBuildError, match="could not build broken.cpp"):
        load_cpu_extension("broken")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler found"):
        load_cpu_extension("broken")


def test_without_a_kernel_the_model_stays_on_sdpa_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(cpu_extension, "_FAILED", {})

    def fail(name):
        raise KernelBuildError("no C++ compiler found (c++, g++, clang++)")

    monkeypatch.setattr(cpu_extension, "load_cpu_extension", fail)
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="lorakit.ops.cpu_extension"):
        assert not use_cpu_attention(model)
        assert not use_cpu_attention(model)
    assert model.config._attn_implementation == "sdpa"
    warnings = [r for r in caplog.records if "attention stays on PyTorch's SDPA" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
