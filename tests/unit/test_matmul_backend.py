"""lorakit.ops.matmul's choice of kernel: bf16 on oneDNN; fp32 on oneDNN where MKL has no fast path (CPUs other
than Intel's) and on MKL on Intel CPUs; LORAKIT_MATMUL forces either; both give x @ w.T to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import matmul
from lorakit.ops.matmul import BACKEND_ENV, linear, linear_add, use_onednn

pytestmark = pytest.mark.skipif(matmul._ONEDNN is None, reason="this PyTorch has no oneDNN linear")


@pytest.mark.parametrize("vendor, fp32_on_onednn", [("GenuineIntel", False), ("AuthenticAMD", True), ("", True)])
def test_fp32_goes_to_onednn_only_where_mkl_is_slow(monkeypatch, vendor, fp32_on_onednn):
    auto = matmul._ONEDNN_DTYPES if vendor != "GenuineIntel" else (torch.bfloat16,)
    monkeypatch.setattr(matmul, "_AUTO_DTYPES", auto)
    monkeypatch.setattr(matmul, "FP32_ONEDNN_MIN_MACS", 0)  # the size rule has its own test
    x32, w32 = torch.randn(4, 8), torch.randn(6, 8)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    assert use_onednn(x32, w32) is fp32_on_onednn
    assert use_onednn(x16, w16)
    assert not use_onednn(x16, w32)  # mixed dtypes: aten
    monkeypatch.setenv(BACKEND_ENV, "onednn")
    assert use_onednn(x32, w32) and use_onednn(x16, w16)
    monkeypatch.setenv(BACKEND_ENV, "aten")
    assert not use_onednn(x32, w32) and not use_onednn(x16, w16)
    monkeypatch.setenv(BACKEND_ENV, "mkl")
    with pytest.raises(ValueError, match="LORAKIT_MATMUL='mkl' is not a matmul backend; use one of"):
        use_onednn(x32, w32)


def test_small_fp32_products_stay_on_aten_unless_onednn_is_forced(monkeypatch):
    monkeypatch.setattr(matmul, "_AUTO_DTYPES", matmul._ONEDNN_DTYPES)  # a CPU whose fp32 goes to oneDNN
    small_rows = matmul.FP32_ONEDNN_MIN_MACS // (576 * 16) - 1  # a decoded token's A x: 8 rows x 576 -> 16
    x, a = torch.randn(small_rows, 576), torch.randn(16, 576)
    big_x, w = torch.randn(256, 576), torch.randn(576, 576)
    assert not use_onednn(x, a)  # below the threshold: MKL's smaller fixed cost wins
    assert use_onednn(big_x, w)
    assert use_onednn(x.bfloat16(), a.bfloat16())  # bf16: both backends run oneDNN; no size rule
    monkeypatch.setenv(BACKEND_ENV, "onednn")
    assert use_onednn(x, a)


def test_this_machines_rule_follows_its_vendor():
    assert matmul._AUTO_DTYPES == ((torch.bfloat16,) if matmul.cpu_vendor() == "GenuineIntel"
                                   else matmul._ONEDNN_DTYPES)


@pytest.mark.parametrize("backend", ["onednn", "aten"])
def test_both_kernels_compute_x_times_w_transposed(monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    g = torch.Generator().manual_seed(0)
    x, w, other = torch.randn(2, 5, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(2, 5, 40, generator=g)
    expected = x.double() @ w.double().T
    torch.testing.assert_close(linear(x, w).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_add(x, w, other).double(), expected + other.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["onednn", "aten"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.25])
def test_linear_add_scales_the_product_as_the_reference_does(monkeypatch, backend, alpha):
    """alpha multiplies the product before the sum: on aten (addmm's alpha) the bits of the two-step reference
    for a power of two, with a LoRA-rank inner dimension; on oneDNN to rounding (its own summation order)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    g = torch.Generator().manual_seed(1)
    for rows, rank, d_out in ((1, 4, 40), (8, 16, 576), (37, 16, 192), (300, 64, 96)):
        u, b = torch.randn(2, rows, rank, generator=g), torch.randn(d_out, rank, generator=g)
        other = torch.randn(2, rows, d_out, generator=g)
        reference = other + torch.nn.functional.linear(u, b) * alpha
        got = linear_add(u, b, other, alpha=alpha)
        assert got.shape == reference.shape
        if backend == "aten":
            assert torch.equal(got, reference)
        else:
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["onednn", "aten"])
def test_linear_add_overwrite_gives_the_same_bits(monkeypatch, backend, dtype):
    """overwrite=True lets aten add into `other` in place (the caller's temporary): the same bits as addmm's copy,
    and for CPU bf16 on oneDNN the same bits as the binary post-op's new tensor; a non-contiguous `other` is never
    written; oneDNN's fp32 returns a new tensor either way."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    g = torch.Generator().manual_seed(2)
    u, b = torch.randn(3, 50, 16, generator=g).to(dtype), torch.randn(96, 16, generator=g).to(dtype)
    other = torch.randn(3, 50, 96, generator=g).to(dtype)
    expected = linear_add(u, b, other, alpha=2.0)
    scratch = other.clone()
    got = linear_add(u, b, scratch, alpha=2.0, overwrite=True)
    assert torch.equal(got, expected)
    in_place = backend == "aten" or (dtype == torch.bfloat16 and matmul._ATEN_BF16_ON_ONEDNN)
    assert (got is scratch) == in_place
    if dtype == torch.bfloat16:
        return  # the strided case below compares to fp32 rounding
    strided = other.clone().transpose(0, 1)  # (50, 3, 96), not contiguous
    kept = strided.clone()
    got = linear_add(u.transpose(0, 1), b, strided, alpha=2.0, overwrite=True)
    assert torch.equal(strided, kept) and got is not strided
    torch.testing.assert_close(got, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
