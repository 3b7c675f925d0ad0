"""lorakit's kernel for a dense layer's product on a few fp32 or bf16 rows (ops/csrc/linear_rows.cpp), and where
ops/matmul.py's linear sends a product to it."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.ops import matmul
from lorakit.ops.cpu_extension import kernels_available
from tests.tiny import tiny_llama

BUILT = torch.ops.lorakit.linear_rows_dtypes() if kernels_available() else []  # the dtypes it runs fast here
needs_kernel = pytest.mark.skipif(not kernels_available(), reason="lorakit's CPU kernels cannot be built here")
needs_bf16 = pytest.mark.skipif("bfloat16" not in BUILT, reason="the bf16 kernel needs AVX512-BF16")
# the dtype linear sends to the kernel on this machine (bf16 where built, else fp32 where "auto" allows it)
RUNS = next((d for d in (torch.bfloat16, torch.float32) if d in matmul.LINEAR_ROWS
             and matmul.linear_rows_runs(torch.ones(matmul.LINEAR_ROWS[d][0], 1, dtype=d), torch.ones(1, 1, dtype=d))),
            None)
needs_runs = pytest.mark.skipif(RUNS is None, reason="linear sends no dtype to the kernel on this machine")
DTYPES = [pytest.param(torch.bfloat16, marks=needs_bf16), torch.float32]


def _operands(shape: tuple[int, ...], d_out: int, bias: bool, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(d_out, shape[-1], generator=g) / shape[-1] ** 0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    return x, w, b


def _reference(x, w, b):
    """The product from the same values in fp64, bias added, then rounded to the operands' dtype once."""
    y = x.double() @ w.double().T
    return (y if b is None else y + b.double()).to(x.dtype)


@needs_bf16
@pytest.mark.parametrize("shape, d_out", [
    ((8, 1, 576), 1536),  # a decoded token of SmolLM2's gate projection, batch 8
    ((8, 1, 1536), 576),
    ((1, 64), 4),
    ((3, 37), 19),        # nothing a multiple of the tile or of the 32 values of a step
    ((17, 100), 7),       # a block of 4 rows and one more
    ((2, 5, 33), 9),      # leading dimensions as rows, 10 of them
    ((32, 96), 130),      # the most rows any CPU sends it (matmul.LINEAR_ROWS)
])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_rounds_the_fp32_sum_to_bf16_once(shape, d_out, bias):
    x, w, b = _operands(shape, d_out, bias)
    out = torch.ops.lorakit.linear_rows(x, w, b)
    assert out.shape == (*shape[:-1], d_out) and out.dtype == torch.bfloat16
    expected = _reference(x, w, b)
    # the fp32 sums run in another order than fp64's: an output may round to the neighbouring bf16 value, never
    # further (one unit in the last place of bf16: 2**-7 relative)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -7, atol=1e-6)
    assert (out != expected).float().mean() < 0.05
    # the library's bf16 product on the same operands differs from it no more than that
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x, w, b).float(), rtol=2 ** -7, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("shape, d_out", [((8, 1, 576), 1536), ((3, 37), 19), ((17, 100), 7), ((2, 5, 33), 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fp32_kernel_equals_the_product_to_fp32_rounding(shape, d_out, bias):
    x, w, b = _operands(shape, d_out, bias, torch.float32)
    out = torch.ops.lorakit.linear_rows(x, w, b)
    assert out.shape == (*shape[:-1], d_out) and out.dtype == torch.float32
    y = x.double() @ w.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(out.double(), y, rtol=1e-5, atol=1e-5 * shape[-1] ** 0.5)


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_multiply():
    x, w, _ = _operands((4, 32), 8, False, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous CPU tensors of one dtype"):
        torch.ops.lorakit.linear_rows(x, w.double(), None)
    with pytest.raises(RuntimeError, match="contiguous CPU tensors of one dtype"):
        torch.ops.lorakit.linear_rows(x.half(), w.half(), None)
    with pytest.raises(RuntimeError, match="contiguous CPU tensors of one dtype"):
        torch.ops.lorakit.linear_rows(x, w.T.contiguous().T, None)
    with pytest.raises(RuntimeError, match="does not match weight"):
        torch.ops.lorakit.linear_rows(x[:, :16].contiguous(), w, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.lorakit.linear_rows(x, w, torch.zeros(7))


def _count_kernel_calls(monkeypatch) -> list:
    """The shapes of the rows linear sends to the kernel from now on."""
    if not matmul._LINEAR_ROWS:
        matmul._load_linear_rows()  # the operator looked up
    real, dtypes = matmul._LINEAR_ROWS
    calls = []

    def spy(x, weight, bias):
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(matmul, "_LINEAR_ROWS", [spy, dtypes])
    return calls


@needs_runs
def test_linear_sends_a_few_rows_to_the_kernel_and_the_rest_to_the_libraries(monkeypatch):
    monkeypatch.delenv(matmul.BACKEND_ENV, raising=False)
    dtype, (fewest, limit) = RUNS, matmul.LINEAR_ROWS[RUNS]
    w = torch.randn(48, 64).to(dtype)
    few, many = torch.randn(max(fewest, limit // 2), 1, 64).to(dtype), torch.randn(limit + 1, 64).to(dtype)
    assert matmul.linear_rows_runs(few, w)
    assert matmul.linear_rows_runs(torch.randn(fewest, 64).to(dtype), w)
    assert not matmul.linear_rows_runs(torch.randn(fewest - 1, 64).to(dtype), w)
    assert matmul.linear_rows_runs(torch.randn(limit, 64).to(dtype), w, torch.zeros(48).to(dtype))
    assert not matmul.linear_rows_runs(many, w)  # a prompt or a training step: the libraries' kernels
    assert not matmul.linear_rows_runs(few.half(), w.half())  # fp16
    assert not matmul.linear_rows_runs(few, w.T.contiguous().T)  # a transposed view (a backward's weight)
    assert not matmul.linear_rows_runs(few, w, torch.zeros(48, dtype=torch.float64))  # a bias of another dtype
    assert not matmul.linear_rows_runs(few[:, :, :32], w[:, :32])  # a non-contiguous slice of the rows
    assert not matmul.linear_rows_runs(torch.empty(0, 64).to(dtype), w)
    monkeypatch.setenv(matmul.BACKEND_ENV, "onednn")  # a library forced, e.g. to compare with it bit for bit
    assert not matmul.linear_rows_runs(few, w)
    monkeypatch.setenv(matmul.BACKEND_ENV, "auto")
    calls = _count_kernel_calls(monkeypatch)
    matmul.linear(few, w)
    matmul.linear(many, w)
    assert calls == [tuple(few.shape)]


def test_the_kernels_rows_follow_the_cpu():
    """Measured (bench/few_rows.py): with AMX, oneDNN's bf16 product is ahead from ~9 rows; on Intel CPUs MKL's
    fp32 product on one row is level with the kernel's or ahead, from 2 rows behind it."""
    amd, intel_amx = matmul.linear_rows_ranges("AuthenticAMD", False), matmul.linear_rows_ranges("GenuineIntel", True)
    assert amd[torch.bfloat16] == (1, 32) and amd[torch.float32] == (1, 16)
    assert intel_amx[torch.bfloat16] == (1, 8) and intel_amx[torch.float32] == (2, 16)
    assert matmul.LINEAR_ROWS == matmul.linear_rows_ranges(matmul.cpu_vendor(), matmul.cpu_has_amx())


@needs_kernel
@pytest.mark.skipif("float32" not in BUILT, reason="the fp32 kernel needs AVX2")
def test_on_an_intel_cpu_one_fp32_row_stays_on_mkl(monkeypatch):
    monkeypatch.delenv(matmul.BACKEND_ENV, raising=False)
    monkeypatch.setattr(matmul, "LINEAR_ROWS", matmul.linear_rows_ranges("GenuineIntel", True))
    w = torch.randn(48, 64)
    assert not matmul.linear_rows_runs(torch.randn(1, 64), w)
    assert matmul.linear_rows_runs(torch.randn(2, 64), w) and matmul.linear_rows_runs(torch.randn(16, 64), w)
    assert not matmul.linear_rows_runs(torch.randn(17, 64), w)
    bf16_w = w.bfloat16()
    assert matmul.linear_rows_runs(torch.randn(8, 64).bfloat16(), bf16_w) == ("bfloat16" in BUILT)
    assert not matmul.linear_rows_runs(torch.randn(9, 64).bfloat16(), bf16_w)  # AMX: oneDNN's tiles


@needs_runs
@torch.no_grad()
@pytest.mark.parametrize("merged", [False, True])
def test_decoding_runs_on_the_kernel_and_matches_the_library_path(monkeypatch, merged):
    """generate() on a LoRA model: the decoded tokens' products go to the kernel, and the tokens are those of the
    same model on the libraries' kernels (LORAKIT_MATMUL=onednn)."""
    model = get_peft_model(tiny_llama(seed=3).to(RUNS), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    if merged:
        model.merge_adapter()
    ids = torch.randint(3, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    monkeypatch.setenv(matmul.BACKEND_ENV, "onednn")
    expected = model.generate(input_ids=ids, **settings)
    monkeypatch.setenv(matmul.BACKEND_ENV, "auto")
    calls = _count_kernel_calls(monkeypatch)
    got = model.generate(input_ids=ids, **settings)
    assert calls and all(torch.Size(shape).numel() // shape[-1] <= matmul.LINEAR_ROWS[RUNS][1] for shape in calls)
    assert torch.equal(got, expected)


def test_without_the_kernel_linear_keeps_the_libraries(monkeypatch):
    monkeypatch.setattr(matmul, "_LINEAR_ROWS", [None, ()])  # no kernels built here
    x, w = torch.randn(8, 64).bfloat16(), torch.randn(48, 64).bfloat16()
    assert not matmul.linear_rows_runs(x, w) and not matmul.linear_rows_runs(x.float(), w.float())
    torch.testing.assert_close(matmul.linear(x, w), torch.nn.functional.linear(x, w))
