"""Dense matmuls `x @ w.T` on the fastest kernel for the device and dtype.

On CPU, PyTorch sends fp32 matmuls to MKL and bf16 ones to oneDNN. MKL's sgemm takes its AVX512 kernels on Intel
processors only and runs a generic AVX2 path on others: on the AMD EPYC (Zen 5) this project was first measured
on, oneDNN's fp32 inner product is 2.1-2.3x faster for every shape of a SmolLM2 training step (~215 vs ~100
GFLOP/s per core), while on an Intel Xeon MKL is the faster one (3-10% per matmul, 1.10x per fp32 step;
docs/performance.md, optimisations 1 and 25). Both compute in IEEE fp32 (no reduced-precision arithmetic); they
differ only in the order of the additions, so results agree to fp32 rounding, not bit for bit.

    linear(x, w)               x @ w.T (+ bias)           x: (..., d_in), w: (d_out, d_in) (any strides)
    linear_add(x, w, other, a) other + a * (x @ w.T)      added in the matmul's output stage (in place on request)

Backend, chosen per call: lorakit's few-rows kernel (ops/csrc/linear_rows.cpp) for a decoded token's batch
(contiguous rows in the range LINEAR_ROWS sets for the dtype and this CPU; bf16 where the CPU has AVX512-BF16: the
libraries rearrange the whole weight on every call, and at a few rows that is most of the call); else
"onednn" for CPU tensors of one dtype when PyTorch has oneDNN (bf16 always; fp32 on CPUs other than Intel's, from
FP32_ONEDNN_MIN_MACS multiply-accumulates up: below, oneDNN's fixed cost per call outweighs its faster kernel),
else "aten" (F.linear: cuBLAS on CUDA, MKL on CPU). A large bf16 product on oneDNN may run in parts of its rows
where that measures faster and gives the same bits (row_split.py). `LORAKIT_MATMUL=aten` forces the aten kernels,
e.g. to compare with another library bit for bit; `LORAKIT_MATMUL=onednn` forces oneDNN (fp32 on Intel CPUs too,
and small fp32 products everywhere); either keeps lorakit's kernel off. These functions do not record autograd
history: call them inside a torch.autograd.Function (methods/lora/fused.py, cross_entropy.py) or without autograd
(inference).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lorakit.ops import row_split
from lorakit.ops.cpu_info import cpu_has_amx, cpu_vendor

BACKEND_ENV = "LORAKIT_MATMUL"
BACKENDS = ("auto", "aten", "onednn")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


# the dtypes "auto" sends to oneDNN: fp32 only where MKL has no fast path (not an Intel CPU)
_AUTO_DTYPES = _ONEDNN_DTYPES if cpu_vendor() != "GenuineIntel" else (torch.bfloat16,)


def _onednn_op():
    try:
        op = torch.ops.mkldnn._linear_pointwise
        op.binary  # noqa: B018 - both overloads must exist
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


_ONEDNN = _onednn_op()


def _aten_bf16_on_onednn() -> bool:
    """Whether aten's bf16 matmuls on the CPU run on oneDNN (AVX512-BF16 or AMX; elsewhere a slow reference loop)."""
    try:
        return _ONEDNN is not None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ATEN_BF16_ON_ONEDNN = _aten_bf16_on_onednn()

# multiply-accumulates (rows x d_in x d_out) from which "auto" sends an fp32 product to oneDNN (where it does fp32):
# below, MKL's smaller fixed cost wins (docs/performance.md, optimisation 27)
FP32_ONEDNN_MIN_MACS = 1 << 21


# os.environ's own store on POSIX (bytes keys): a lookup there costs ~0.05 us against os.environ.get's ~0.8
# (key and value encoding), and requested_backend runs for every matmul of a step and every layer of a decoded
# token; os.environ's setters keep it current
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_BACKEND_ENV_BYTES = BACKEND_ENV.encode()


def _backend_setting() -> str | None:
    if isinstance(_ENVIRON_BYTES, dict):
        value = _ENVIRON_BYTES.get(_BACKEND_ENV_BYTES)
        return None if value is None else os.fsdecode(value)
    return os.environ.get(BACKEND_ENV)


def requested_backend() -> str:
    value = _backend_setting()
    if not value:  # the common case, first
        return "auto"
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a matmul backend; use one of {', '.join(BACKENDS)}")
    return value


def use_onednn(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor | None = None) -> bool:
    """True when oneDNN runs `x @ weight.T` (+ other: a bias, or the tensor linear_add adds): CPU tensors of one
    dtype, oneDNN present, the dtype one "auto" sends to oneDNN on this CPU (or any supported one under
    LORAKIT_MATMUL=onednn), not forced off. Under "auto", an fp32 product smaller than FP32_ONEDNN_MIN_MACS
    stays on aten: oneDNN's fixed cost per call (~20 us: a decoded token's rank-r products) outweighs its faster
    fp32 kernel there. Plain code, run for every matmul of a step (~1,300)."""
    if _ONEDNN is None or not x.is_cpu or not weight.is_cpu:
        return False
    dtype = x.dtype
    if weight.dtype != dtype or (other is not None and (other.dtype != dtype or not other.is_cpu)):
        return False
    if dtype in _AUTO_DTYPES:
        if dtype == torch.float32 and x.numel() * weight.shape[0] < FP32_ONEDNN_MIN_MACS:
            return requested_backend() == "onednn"
        return requested_backend() != "aten"
    return dtype in _ONEDNN_DTYPES and requested_backend() == "onednn"


def kernels() -> dict:
    """name -> `x @ weight.T` of each backend present here ("aten"; "onednn" where PyTorch has it), without the
    per-call choice of `linear`: for probes that time the kernels themselves (lorakit.bench.harness.matmul_rates)."""
    found = {"aten": F.linear}
    if _ONEDNN is not None:
        found["onednn"] = lambda x, weight: _ONEDNN(x, weight, None, "none", [], "")
    return found


# the rows lorakit's kernel (ops/csrc/linear_rows.cpp) multiplies by a plain weight faster than the libraries, which
# rearrange the weight on every call: (fewest, most) by dtype, for this CPU. SmolLM2's projections, cycled as a
# token reads them, 2 threads, us a call (bench/few_rows.py; docs/performance.md, optimisations 39 and 42):
# - bf16 against oneDNN: on AVX512-BF16 without AMX (AMD EPYC) 8 rows 53 vs 114, 32 rows 131 vs 179, level at 64;
#   with AMX (Intel Xeon), whose tiles oneDNN uses from a few rows on, 4 rows 55 vs 77, 8 rows 78 vs 81, 10 rows
#   87 vs 80, 16 rows 127 vs 86
# - fp32 against oneDNN (AMD EPYC) 8 rows 118 vs 151, 16 rows 183 vs 196, 32 rows 304 vs 281; against MKL (Intel
#   Xeon, where fp32 runs on MKL) 1 row 78 vs 77, 2 rows 83 vs 83, 8 rows 113 vs 145, 16 rows 144 vs 172, 32 rows
#   210 vs 207: one row stays on MKL there
def linear_rows_ranges(vendor: str, amx: bool) -> dict:
    """dtype -> (fewest, most) rows `linear` sends to lorakit's kernel on a CPU of this vendor, with or without AMX."""
    return {torch.bfloat16: (1, 8 if amx else 32), torch.float32: (2 if vendor == "GenuineIntel" else 1, 16)}


LINEAR_ROWS = linear_rows_ranges(cpu_vendor(), cpu_has_amx())
# filled on first use: the kernel's operator and the dtypes it runs fast here (bf16 where the CPU has AVX512-BF16)
_LINEAR_ROWS: list = []


def _load_linear_rows() -> None:
    from lorakit.ops.cpu_extension import kernels_available  # lazily: the kernels build on first use
    dtypes = ()
    if kernels_available():
        built = torch.ops.lorakit.linear_rows_dtypes()
        dtypes = tuple(d for d in LINEAR_ROWS if str(d).removeprefix("torch.") in built)
    _LINEAR_ROWS[:] = [torch.ops.lorakit.linear_rows.default if dtypes else None, dtypes]


def linear_rows_runs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when lorakit's few-rows kernel computes `x @ weight.T (+ bias)`: contiguous CPU rows in LINEAR_ROWS's
    range for their dtype (a decoded token's batch), a dtype the kernel runs fast here, a contiguous weight (and
    bias) of that dtype, the "auto" backend. Plain code, run for every layer of every decoded token."""
    dtype = x.dtype
    rows = LINEAR_ROWS.get(dtype)
    if rows is None or not (weight.dtype == dtype and x.is_cpu and weight.is_cpu
                            and rows[0] * x.shape[-1] <= x.numel() <= rows[1] * x.shape[-1]
                            and x.is_contiguous() and weight.is_contiguous()
                            and (bias is None or (bias.dtype == dtype and bias.is_cpu and bias.is_contiguous()))
                            and requested_backend() == "auto"):
        return False
    if not _LINEAR_ROWS:
        _load_linear_rows()
    return dtype in _LINEAR_ROWS[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), in x's dtype (all operands must share it)."""
    if linear_rows_runs(x, weight, bias):
        return _LINEAR_ROWS[0](x, weight, bias)
    if use_onednn(x, weight, bias):
        if _ATEN_BF16_ON_ONEDNN and row_split.applies(x, weight, bias):
            return row_split.linear(x, weight, _onednn_linear)
        return _ONEDNN(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _ONEDNN(x, weight, None, "none", [], "")


def linear_layer(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A dense nn.Linear's output for x: without autograd on `linear` (the kernel choice above), with autograd the
    layer's own forward (its gradients). For frozen layers that lorakit calls itself: the serving layer's base
    product, the output head during generation."""
    if torch.is_grad_enabled():
        return torch.nn.Linear.forward(layer, x)
    return linear(x, layer.weight, layer.bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor, alpha: float = 1.0,
               overwrite: bool = False) -> torch.Tensor:
    """other + alpha * (x @ weight.T); `other` has the result's shape. The sum is made in the matmul's output
    stage: oneDNN's binary post-op (with x scaled first when alpha != 1), aten's addmm (alpha its own
    argument). Where this is used, the inner dimension is a LoRA rank, which the kernels reduce in one block:
    the value is that of `other + F.linear(x, weight) * alpha` bit for bit when alpha is a power of two
    (tests/unit/test_matmul_backend.py). overwrite=True: `other` is the caller's own temporary (no autograd
    history) and may receive the result; aten then adds in place (addmm_), one pass over `other` fewer than
    addmm's copy, with the same bits, and so does CPU bf16, whose addmm_ runs on oneDNN (optimisation 44)."""
    onednn = use_onednn(x, weight, other)
    if overwrite and other.is_contiguous() and (not onednn or (x.dtype == torch.bfloat16 and _ATEN_BF16_ON_ONEDNN)):
        # in place: aten's addmm_ (on CPU bf16, oneDNN's matmul with the sum in its output stage, which reads and
        # writes `other` once and allocates nothing; faster than the binary post-op's new output, the same bits)
        other.view(-1, other.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.T, alpha=alpha)
        return other
    if onednn and other.shape[:-1] == x.shape[:-1] and other.is_contiguous():
        return _ONEDNN.binary(x if alpha == 1.0 else x * alpha, other, weight, None, "add")
    x2, other2 = x.reshape(-1, x.shape[-1]), other.reshape(-1, other.shape[-1])
    return torch.addmm(other2, x2, weight.T, alpha=alpha).view(other.shape)
