"""NF4: 4-bit NormalFloat blockwise quantization, with double quantization of the scales, in plain PyTorch.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314), Sec. 3; the layout of bitsandbytes'
`quantize_4bit(quant_type="nf4", compress_statistics=True)`, without needing bitsandbytes:

    W (any shape, n values) -> flat, zero-padded to a multiple of `blocksize` (64)
    absmax_b = max |W_i| over block b                 one fp32 scale per block
    q_i      = nearest NF4 code to W_i * (1 / absmax_b)   index 0..15 into NF4_CODES (16 values in [-1, 1])
    byte j   = q_{2j} << 4 | q_{2j+1}                 two codes per byte, the first in the high nibble
    W_i     ~= NF4_CODES[q_i] * absmax_b

"Nearest" is exact: a value exactly halfway between two codes takes the lower one (bitsandbytes' CUDA
kernel compares `x > midpoint`; its PyTorch reference takes the first argmin).

Double quantization (QLoRA Sec. 3, "Double Quantization"): the fp32 scales minus their mean are quantized
to 8 bits in blocks of 256 with bitsandbytes' dynamic 8-bit map (`create_dynamic_map(signed=True)`), each
block of scales with its own fp32 absmax:

    absmax_b ~= DYNAMIC_CODES[c_b] * absmax2_{b // 256} + mean(absmax)

Bits per weight: 4 + 8/64 + 32/(64*256) = 4.127 with double quantization, 4 + 32/64 = 4.5 without (bf16: 16).
Padding: a weight whose size is not a multiple of the block is zero-padded (zeros never raise a block's
absmax) and `dequantize()` drops the padding again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# bitsandbytes' NF4 code values (`get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_TENSOR = torch.tensor(NF4_CODES, dtype=torch.float32)
DEFAULT_BLOCKSIZE = 64
SCALE_BLOCKSIZE = 256  # block size of the double quantization of the scales


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`, Dettmers 2015,
    https://arxiv.org/abs/1511.04561): for each decade e = 0..6, the 2^e midpoints of an even grid over
    [0.1, 1], times 10^(e-6), with both signs; plus 0 and 1. 256 sorted fp32 values, fine near 0."""
    values = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2 ** e + 1)
        for m in ((grid[:-1] + grid[1:]) / 2 * 10 ** (e - 6)).tolist():
            values += [m, -m]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODES = dynamic_map()


class Codebook:
    """Sorted code values in [-1, 1] and the exact nearest-code rule: x takes code i + 1 over code i exactly when
    it is nearer to it in real arithmetic (the real midpoint, not its fp32 rounding; a tie takes the lower code).

    grid_bins: for codes far apart (NF4's gaps are >= 0.079), a branch-free lookup over a uniform grid of
    [-1, 1], ~20x faster than a binary search: each bin holds at most one threshold, so the code index is
    "thresholds below the bin" + (x > the bin's threshold). Without it (the 8-bit map, whose codes crowd
    near 0), a binary search over the thresholds.
    """

    def __init__(self, values: torch.Tensor, grid_bins: int | None = None) -> None:
        self.values = values
        c = values.double()
        mid = (c[:-1] + c[1:]) / 2  # exact in float64: the codes are fp32
        t = mid.float()  # for fp32 x, "x > t" must mean "x > mid": step below a midpoint fp32 rounded up
        self.thresholds = torch.where(t.double() > mid, torch.nextafter(t, torch.tensor(-torch.inf)), t)
        self.grid_bins = grid_bins
        self.grid = self._grid_tables(grid_bins) if grid_bins else None
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _grid_tables(self, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A value x lands in bin floor((x + 1) * bins / 2), computed in fp32 within 1.2e-7 of the exact bin
        # position; widening each bin by `slack` covers that, so the tables are exact for every fp32 x.
        slack = 1e-6
        low = torch.arange(bins, dtype=torch.float64) * 2 / bins - 1 - slack
        high = low + 2 / bins + 2 * slack
        t = self.thresholds.double()
        inside = (t[None, :] >= low[:, None]) & (t[None, :] <= high[:, None])
        if inside.sum(dim=1).max() > 1:
            raise ValueError(f"codebook: {bins} grid bins are too coarse for these codes")
        below = (t[None, :] < low[:, None]).sum(dim=1).to(torch.uint8)
        threshold = torch.where(inside.any(dim=1), self.thresholds[inside.int().argmax(dim=1)],
                                torch.tensor(torch.inf))
        return below, threshold

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(values, thresholds, grid tables...) on `device`, copied there once."""
        if device not in self._on_device:
            tables = (self.values, self.thresholds) + (self.grid or ())
            self._on_device[device] = tuple(t.to(device) for t in tables)
        return self._on_device[device]

    def values_on(self, device: torch.device) -> torch.Tensor:
        return self._tables(device)[0]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code of every fp32 value in [-1, 1], as uint8 (x's shape)."""
        tables = self._tables(x.device)
        if self.grid is None:
            return torch.bucketize(x, tables[1], out_int32=True).to(torch.uint8)
        below, threshold = tables[2:]
        bins = ((x + 1) * (self.grid_bins / 2)).to(torch.int32).clamp_(0, self.grid_bins - 1).view(-1)
        index = torch.index_select(below, 0, bins) + (x.reshape(-1) > torch.index_select(threshold, 0, bins))
        return index.view(x.shape)


NF4 = Codebook(NF4_TENSOR, grid_bins=4096)
DYNAMIC = Codebook(DYNAMIC_CODES)


def blockwise_absmax_codes(flat: torch.Tensor, blocksize: int, codebook: Codebook
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `flat` (fp32, length a multiple of blocksize): x * (1 / absmax) per block mapped to
    its nearest code, as bitsandbytes scales (an all-zero block has absmax 0 and codes of 0)."""
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normalized = (blocks * inverse[:, None]).clamp_(-1.0, 1.0)
    return codebook.nearest(normalized).view(-1), absmax


def pad_to_multiple(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -flat.numel() % multiple
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


# ---- the scales: fp32, or double-quantized (a strategy each) ------------------------------------------------
@dataclass
class PlainScales:
    """One fp32 absmax per block (no double quantization): 32 bits per block."""

    absmax: torch.Tensor  # fp32 (blocks,)

    @classmethod
    def quantize(cls, absmax: torch.Tensor) -> "PlainScales":
        return cls(absmax)

    def dequantize(self) -> torch.Tensor:
        return self.absmax.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax}


@dataclass
class DoubleQuantScales:
    """The absmax values minus their mean, in 8-bit dynamic codes per block of 256 with an fp32 scale each:
    absmax_b ~= DYNAMIC_CODES[codes_b] * scales_{b // 256} + offset. 8 bits per block (+ 32 per 256 blocks)."""

    codes: torch.Tensor  # uint8 (blocks,)
    scales: torch.Tensor  # fp32 (ceil(blocks / 256),)
    offset: torch.Tensor  # fp32 (): the mean of the absmax values

    @classmethod
    def quantize(cls, absmax: torch.Tensor) -> "DoubleQuantScales":
        offset = absmax.mean()
        centred = pad_to_multiple(absmax - offset, SCALE_BLOCKSIZE)
        codes, scales = blockwise_absmax_codes(centred, SCALE_BLOCKSIZE, DYNAMIC)
        return cls(codes[: absmax.numel()].clone(), scales, offset)

    def dequantize(self) -> torch.Tensor:
        values = torch.index_select(DYNAMIC.values_on(self.codes.device), 0, self.codes.int())
        values = pad_to_multiple(values, SCALE_BLOCKSIZE).view(-1, SCALE_BLOCKSIZE)
        return (values * self.scales.float()[:, None]).view(-1)[: self.codes.numel()] + self.offset.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"absmax_codes": self.codes, "absmax_scales": self.scales, "absmax_offset": self.offset}


SCALE_FORMATS = {False: PlainScales, True: DoubleQuantScales}  # double_quant -> how the scales are stored


# ---- the quantized tensor ----------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """A weight in NF4: packed 4-bit codes and per-block scales. Made by `quantize_nf4`.

    shape / dtype: the original weight's; `dequantize()` returns that shape in that dtype (or `dtype=`).
    nbytes: the bytes the quantized form holds (codes and scales), to compare with `numel * element_size`.
    """

    packed: torch.Tensor  # uint8 (padded numel // 2,)
    scales: PlainScales | DoubleQuantScales
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @property
    def double_quant(self) -> bool:
        return isinstance(self.scales, DoubleQuantScales)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the quantized form by name (`packed`, `absmax` or `absmax_codes/scales/offset`):
        what a module registers as buffers (plain tensors: state dicts and safetensors hold them)."""
        return {"packed": self.packed, **self.scales.tensors()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, dtype: torch.dtype, blocksize: int) -> "NF4Tensor":
        """Inverse of `tensors()`; shape, dtype and blocksize are not stored in tensors."""
        if "absmax_codes" in tensors:
            scales = DoubleQuantScales(tensors["absmax_codes"], tensors["absmax_scales"], tensors["absmax_offset"])
        else:
            scales = PlainScales(tensors["absmax"])
        return cls(tensors["packed"], scales, torch.Size(shape), dtype, blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, `shape` in `dtype` (default: the original dtype). One lookup per packed byte in a 2 KB
        table (in cache even between the layers of a training step) giving both codes' fp32 values as one
        8-byte word, then one multiply per value; the product is formed in fp32 and rounded once."""
        dtype = dtype or self.dtype
        pairs = torch.index_select(_pair_table(self.device), 0, self.packed.int())  # (bytes,) int64
        values = pairs.view(torch.float32).view(-1, self.blocksize).mul_(self.scales.dequantize()[:, None])
        return values.view(-1)[: self.numel()].view(self.shape).to(dtype)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.shape))
        return (f"NF4Tensor({shape}, {str(self.dtype).removeprefix('torch.')}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, {self.nbytes:,d} bytes)")


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256,) int64, cached per device: for every byte, the fp32 values of its two codes (high nibble first) as
    one 8-byte word. A 1-D gather of 8-byte words is ~3x faster than gathering rows of two floats."""
    if device not in _PAIR_TABLES:
        byte = torch.arange(256)
        pairs = torch.stack([NF4_TENSOR[byte >> 4], NF4_TENSOR[byte & 15]], dim=1)  # (256, 2) fp32
        _PAIR_TABLES[device] = pairs.view(torch.int64).view(-1).to(device)
    return _PAIR_TABLES[device]


def check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even integer >= 2 (two 4-bit codes per byte; bitsandbytes uses "
                         f"64..4096), got {blocksize!r}")


def quantize_nf4(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 dtype: torch.dtype | None = None) -> NF4Tensor:
    """Quantize a floating-point tensor of any shape to NF4 (see the module docstring).

        q = quantize_nf4(layer.weight)          # 4.127 bits per weight
        w = q.dequantize()                      # same shape and dtype as layer.weight

    dtype: the dense dtype the codes stand for (dequantize()'s default), when not the weight's own: a bf16
    checkpoint's weight quantized as stored for an fp32 model (models/stored_bf16.py). The codes are the same:
    quantization reads the weight in fp32 either way.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a floating-point tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor; there is nothing to quantize")
    flat = weight.detach().reshape(-1).float()
    codes, absmax = blockwise_absmax_codes(pad_to_multiple(flat, blocksize), blocksize, NF4)
    if not torch.isfinite(absmax).all():  # a NaN or inf anywhere shows in its block's absmax
        raise ValueError("quantize_nf4: the weight holds NaN or inf values, which NF4 cannot represent")
    packed = (codes[0::2] << 4) | codes[1::2]
    return NF4Tensor(packed, SCALE_FORMATS[double_quant].quantize(absmax), weight.shape, dtype or weight.dtype,
                     blocksize)
