"""NF4 quantization (methods/quant/nf4.py) against a reference written here from the algorithm's description
(QLoRA Sec. 3, bitsandbytes' layout): codes, packing, round-trip error, double quantization, bytes."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit import quantize_nf4
from lorakit.methods.quant.nf4 import DYNAMIC_CODES, NF4_CODES, NF4Tensor

CODES64 = torch.tensor(NF4_CODES, dtype=torch.float64)


def reference_nf4(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bytes, fp32 absmax) one block and one value at a time: zero-pad to whole blocks; per block
    absmax = max |x|; x * (1 / absmax) in fp32; the code at the smallest exact (float64) distance, the lower
    index on a tie (argmin returns the first); two codes per byte, the first in the high nibble."""
    flat = weight.reshape(-1).float()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % blocksize)])
    codes, absmaxes = [], []
    for block in flat.split(blocksize):
        absmax = block.abs().max()
        normalized = block * (1 / absmax) if absmax > 0 else torch.zeros_like(block)
        for value in normalized.double():
            codes.append(int(torch.argmin((value - CODES64).abs())))
        absmaxes.append(absmax)
    packed = [codes[i] * 16 + codes[i + 1] for i in range(0, len(codes), 2)]
    return torch.tensor(packed, dtype=torch.uint8), torch.stack(absmaxes)


def reference_dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    """code value (high nibble first) times its block's absmax, in fp32; the padding dropped."""
    codes = torch.stack([packed.long() >> 4, packed.long() & 15], dim=1).view(-1)
    values = torch.tensor(NF4_CODES)[codes] * absmax.repeat_interleave(blocksize)
    return values[:numel]


@pytest.mark.parametrize("shape,blocksize", [((8, 64), 64), ((5, 77), 64), ((3, 40), 32), ((300,), 128),
                                             ((7, 9), 2), ((50,), 12)])
def test_codes_scales_and_dequantized_values_equal_the_reference(shape, blocksize):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    weight.view(-1)[3] = 0.0  # an exact zero and a block maximum are among the values
    packed, absmax = reference_nf4(weight, blocksize)
    q = quantize_nf4(weight, blocksize=blocksize, double_quant=False)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.scales.absmax, absmax)
    expected = reference_dequantize(packed, absmax, blocksize, weight.numel()).view(shape)
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(q.dequantize(torch.bfloat16), expected.to(torch.bfloat16))  # one rounding, from fp32


def test_values_at_and_next_to_every_midpoint_take_the_nearest_code_ties_low():
    """With absmax 1 the normalized values are the inputs: probe each midpoint between neighbouring codes
    (when fp32 holds it exactly) and the fp32 values just below and above it."""
    probes = [1.0, -1.0]  # put the block's absmax at 1
    for low, high in zip(NF4_CODES, NF4_CODES[1:]):
        mid = torch.tensor((low + high) / 2, dtype=torch.float64)
        mid32 = mid.float()
        below = torch.nextafter(mid32, torch.tensor(-2.0)) if mid32.double() >= mid else mid32
        above = torch.nextafter(mid32, torch.tensor(2.0)) if mid32.double() <= mid else mid32
        probes += [below.item(), above.item()] + ([mid32.item()] if mid32.double() == mid else [])
    weight = torch.tensor(probes + [0.0] * (-len(probes) % 64), dtype=torch.float32)
    packed, _ = reference_nf4(weight, 64)
    assert torch.equal(quantize_nf4(weight, double_quant=False).packed, packed)
    ties = [i for i, p in enumerate(probes) if any(2 * p == lo + hi for lo, hi in zip(NF4_CODES, NF4_CODES[1:]))]
    assert ties, "no exactly representable midpoint probed"
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)
    for i in ties:  # a tie goes to the lower code
        assert NF4_CODES[codes[i]] < probes[i]


def test_round_trip_shape_dtype_padding_and_error_bounds():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 29, generator=gen).to(torch.bfloat16)  # 1073 values: not a multiple of 64
    q = quantize_nf4(weight, double_quant=False)
    assert q.packed.numel() == math.ceil(37 * 29 / 64) * 32  # padded to whole blocks, 2 codes per byte
    restored = q.dequantize()
    assert restored.shape == weight.shape and restored.dtype == torch.bfloat16
    exact = q.dequantize(torch.float32)
    # each value is within half the widest gap between neighbouring codes, times its block's absmax
    half_gap = max(b - a for a, b in zip(NF4_CODES, NF4_CODES[1:])) / 2
    flat = torch.cat([weight.float().view(-1), torch.zeros(-weight.numel() % 64)]).view(-1, 64)
    bound = (flat.abs().amax(dim=1, keepdim=True) * half_gap).expand(-1, 64).reshape(-1)[: weight.numel()]
    bound = bound.view(weight.shape)
    assert ((exact - weight.float()).abs() <= bound * (1 + 1e-6)).all()
    # the block maxima come back exactly (code +-1 times the fp32 absmax)
    block_max = flat.abs().argmax(dim=1) + torch.arange(flat.shape[0]) * 64
    block_max = block_max[block_max < weight.numel()]
    assert torch.equal(exact.view(-1)[block_max], weight.float().view(-1)[block_max])


def test_gaussian_relative_error_is_that_of_nf4():
    weight = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))
    for double_quant in (False, True):
        restored = quantize_nf4(weight, double_quant=double_quant).dequantize()
        error = ((restored - weight).norm() / weight.norm()).item()
        assert 0.07 < error < 0.10, (double_quant, error)  # 0.092 measured: 16 levels, blocks of 64


def test_double_quantization_of_the_scales():
    weight = torch.randn(1000, 64, generator=torch.Generator().manual_seed(3)) * 0.02  # 1000 blocks: 4 of 256
    plain = quantize_nf4(weight, double_quant=False)
    double = quantize_nf4(weight, double_quant=True)
    assert torch.equal(plain.packed, double.packed)  # the 4-bit codes do not depend on how scales are stored
    absmax = plain.scales.absmax
    scales = double.scales
    assert scales.codes.dtype == torch.uint8 and scales.codes.numel() == 1000
    assert scales.scales.shape == (4,) and scales.offset.item() == pytest.approx(absmax.mean().item(), rel=1e-6)
    # reference: centred absmax, blockwise absmax of 256, nearest dynamic code
    centred = torch.cat([absmax - absmax.mean(), torch.zeros(24)]).view(4, 256)
    absmax2 = centred.abs().amax(dim=1)
    normalized = (centred * (1 / absmax2)[:, None]).view(-1, 1).double()
    expected = torch.argmin((normalized - DYNAMIC_CODES.double()).abs(), dim=1)[:1000]
    assert torch.equal(scales.codes.long(), expected)
    assert torch.equal(scales.scales, absmax2)
    # error bound: half the widest gap of the 8-bit map, times the block's absmax2
    half_gap = (DYNAMIC_CODES[1:] - DYNAMIC_CODES[:-1]).max().item() / 2
    error = (scales.dequantize() - absmax).abs()
    assert (error <= absmax2.repeat_interleave(256)[:1000] * half_gap + 1e-9).all()
    assert (error / absmax).max() < 0.01  # measured 0.3%: the scales lose under 1%
    restored_plain, restored_double = plain.dequantize(), double.dequantize()
    extra = ((restored_double - restored_plain).norm() / (restored_plain - weight).norm()).item()
    assert extra < 0.05  # double quantization adds < 5% to NF4's own error


def test_dynamic_map_is_bitsandbytes_signed_dynamic_map():
    assert DYNAMIC_CODES.numel() == 256 and torch.unique(DYNAMIC_CODES).numel() == 256
    assert DYNAMIC_CODES[0].item() == pytest.approx(-0.99297, abs=1e-5) and DYNAMIC_CODES[-1].item() == 1.0
    assert (DYNAMIC_CODES == 0).sum() == 1 and DYNAMIC_CODES.abs().min() == 0
    # the smallest magnitudes: 10^-6 * 0.55 (one midpoint in the first decade)
    assert DYNAMIC_CODES[DYNAMIC_CODES > 0].min().item() == pytest.approx(0.55e-6, rel=1e-5)


def test_byte_accounting():
    out_features, in_features = 1536, 576  # SmolLM2's up_proj
    n = out_features * in_features
    weight = torch.randn(out_features, in_features)
    double = quantize_nf4(weight.to(torch.bfloat16))
    blocks = n // 64
    assert double.nbytes == n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    assert double.nbytes <= 0.3 * 2 * n  # at most 0.3x the bf16 bytes (0.258x)
    assert double.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # 4.127
    plain = quantize_nf4(weight, double_quant=False)
    assert plain.nbytes == n // 2 + 4 * blocks and plain.bits_per_weight == 4.5
    assert plain.nbytes <= 0.3 * 2 * n
    assert double.nbytes == sum(t.numel() * t.element_size() for t in double.tensors().values())


def test_tensors_round_trip_and_repr():
    weight = torch.randn(16, 64)
    q = quantize_nf4(weight)
    again = NF4Tensor.from_tensors(q.tensors(), q.shape, q.dtype, q.blocksize)
    assert torch.equal(again.dequantize(), q.dequantize())
    assert "NF4Tensor(16x64, float32, blocksize=64, double_quant=True" in repr(q)


@pytest.mark.parametrize("weight,kwargs,message", [
    (torch.ones(4, 64, dtype=torch.int32), {}, "floating-point tensor"),
    (torch.ones(4, 64), {"blocksize": 63}, "blocksize must be an even integer"),
    (torch.ones(4, 64), {"blocksize": 0}, "blocksize must be an even integer"),
    (torch.ones(4, 64), {"blocksize": 64.0}, "blocksize must be an even integer"),
    (torch.ones(4, 64), {"double_quant": "yes"}, "double_quant must be True or False"),
    (torch.ones(0, 64), {}, "empty tensor"),
    (torch.tensor([1.0, float("nan")]), {}, "NaN or inf"),
])
def test_bad_input(weight, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        quantize_nf4(weight, **kwargs)


def test_all_zero_blocks_and_tiny_tensors():
    weight = torch.zeros(3)
    q = quantize_nf4(weight)
    assert torch.equal(q.dequantize(), weight)
    assert q.dequantize().shape == (3,)
