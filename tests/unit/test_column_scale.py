"""ops/column_scale.py: DoRA's output scaling, one pass each way, against autograd on the promoted expression."""

import pytest
import torch

from lorakit.ops import column_scale
from lorakit.ops.cpu_extension import kernels_available


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("width", [40, 1537])  # vector tails
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_columns_and_its_backward_are_autograds_promoted_expression(dtype, width, bias):
    torch.manual_seed(0)
    y = (torch.randn(3, 5, width) * 3).to(dtype).requires_grad_(True)
    scale = (torch.rand(width) + 0.5).requires_grad_(True)
    b = torch.randn(width).to(dtype) if bias else None
    grad = torch.randn(3, 5, width).to(dtype)
    reference = ((y * scale) if b is None else (y * scale + b)).to(dtype)  # fp32 product, one rounding
    want_dy, want_dscale = torch.autograd.grad(reference, [y, scale], grad)
    out = column_scale.scale_columns(y.detach(), scale.detach(), b)
    dy, dscale = column_scale.scale_columns_backward(grad, y.detach(), scale.detach(), need_scale=True)
    assert out.dtype == dy.dtype == dtype and dscale.dtype == torch.float32
    assert torch.equal(out, reference.detach()) and torch.equal(dy, want_dy)  # bit for bit
    torch.testing.assert_close(dscale, want_dscale, rtol=1e-6, atol=1e-5)  # fp32 sums, another order
    dy_alone, none = column_scale.scale_columns_backward(grad, y.detach(), scale.detach(), need_scale=False)
    assert none is None and torch.equal(dy_alone, dy)


def test_bf16_on_the_cpu_runs_lorakits_kernel(monkeypatch):
    if not kernels_available():
        pytest.skip("lorakit's CPU kernels are not built here")
    calls = []
    for op in ("scale_columns", "scale_columns_bwd"):
        real = getattr(torch.ops.lorakit, op)
        monkeypatch.setattr(torch.ops.lorakit, op, lambda *a, real=real, op=op: calls.append(op) or real(*a))
    y = torch.randn(4, 64).bfloat16()
    column_scale.scale_columns(y, torch.rand(64))
    column_scale.scale_columns_backward(torch.randn(4, 64).bfloat16(), y, torch.rand(64), True)
    assert calls == ["scale_columns", "scale_columns_bwd"]
