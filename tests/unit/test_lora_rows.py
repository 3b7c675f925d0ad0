"""lorakit's kernels for a LoRA adapter's update of a few fp32 or bf16 rows, one adapter or one per sequence
(ops/lora_rows.py, csrc/lora_rows.cpp), where the layers use them, and the output head during generation (its
contiguous input, lorakit's matmul: ops/lm_head.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.methods.lora import fused
from lorakit.ops import lora_rows, matmul
from lorakit.ops.cpu_extension import kernels_available
from lorakit.ops.lm_head import head_to_lorakit_matmul
from lorakit.ops.matmul import BACKEND_ENV
from tests.mixed_batch import rows_run_alone
from tests.tiny import tiny_llama

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="lorakit's CPU kernels cannot be built here")


def _operands(rows: int, d_in: int, r: int, d_out: int, seed: int = 0, lead: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, d_in, generator=g)
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    return x, a, b, torch.randn(*lead, rows, d_out, generator=g)


def _spy_kernels(monkeypatch) -> list:
    """The dtypes of the rows each call of the single-adapter kernels got: lora_rows_ (the update alone) or
    lora_linear_rows (the base product and the update in one call, where lorakit's few-rows matmul runs)."""
    calls = []
    for name, rows_at in (("lora_rows_", 1), ("lora_linear_rows", 0)):
        kernel = getattr(lora_rows, name)
        monkeypatch.setattr(lora_rows, name, lambda *args, kernel=kernel, i=rows_at: calls.append(args[i].dtype)
                            or kernel(*args))
    return calls


@needs_kernels
@pytest.mark.parametrize("rows, d_in, r, d_out", [
    (8, 576, 16, 1536),  # a decoded token of SmolLM2's gate projection, batch 8
    (1, 24, 4, 40),
    (16, 37, 7, 19),     # nothing a multiple of the vector width
    (13, 100, 1, 3),
    (5, 64, 80, 33),     # a rank above the kernel's on-stack tile
    (9, 17, 16, 16),     # one row past a block of 8
])
@pytest.mark.parametrize("scaling", [2.0, 0.3])
def test_the_kernel_computes_the_lora_update_in_place(rows, d_in, r, d_out, scaling):
    x, a, b, out = _operands(rows, d_in, r, d_out)
    expected_u = x.double() @ a.double().T
    expected = out.double() + scaling * (expected_u @ b.double().T)
    result = out.clone()
    u = lora_rows.lora_rows_(result, x, a, b, scaling)
    assert u.shape == (rows, r) and u.dtype == torch.float32
    torch.testing.assert_close(u.double(), expected_u, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_the_kernel_takes_leading_dimensions_as_rows():
    x, a, b, out = _operands(1, 24, 4, 40, lead=(8,))  # (batch, 1 token, d): a decoding step's layout
    flat = out.reshape(8, 40).clone()
    u_flat = lora_rows.lora_rows_(flat, x.reshape(8, 24), a, b, 2.0)
    u = lora_rows.lora_rows_(out, x, a, b, 2.0)
    assert torch.equal(out.reshape(8, 40), flat) and torch.equal(u, u_flat)


@needs_kernels
@pytest.mark.parametrize("rows, d_in, r, d_out", [(8, 576, 16, 1536), (16, 37, 7, 19), (5, 64, 80, 33)])
def test_on_bf16_rows_the_kernel_adds_the_fp32_update_and_rounds_each_output_once(rows, d_in, r, d_out):
    """bf16 out and x with fp32 factors (an fp32 adapter on a bf16 base): the same fp32 computation as on the rows
    upcast to fp32, each output rounded to bf16 once: bit for bit that result rounded."""
    x, a, b, out = _operands(rows, d_in, r, d_out)
    x, out = x.bfloat16(), out.bfloat16()
    upcast = out.float()
    u_upcast = lora_rows.lora_rows_(upcast, x.float(), a, b, 2.0)
    result = out.clone()
    u = lora_rows.lora_rows_(result, x, a, b, 2.0)
    assert result.dtype == torch.bfloat16 and u.dtype == torch.float32
    assert torch.equal(u, u_upcast) and torch.equal(result, upcast.bfloat16())
    assert not torch.equal(result, out)


@needs_kernels
@pytest.mark.parametrize("change, message", [
    (lambda x, a, b, out: (x.double(), a, b, out), "out and x must be contiguous CPU tensors, both fp32 or both bf16"),
    (lambda x, a, b, out: (x, a, b, out.T), "out and x must be contiguous CPU tensors"),
    (lambda x, a, b, out: (x.bfloat16(), a, b, out), "both fp32 or both bf16; got Float and BFloat16"),
    (lambda x, a, b, out: (x.bfloat16(), a.bfloat16(), b, out.bfloat16()), "a must be a contiguous fp32 CPU tensor"),
    (lambda x, a, b, out: (x, a[:, :-1].contiguous(), b, out), "shapes do not match"),
    (lambda x, a, b, out: (x, a, b, out[:, :-1].contiguous()), "shapes do not match"),
])
def test_the_kernel_rejects_what_it_cannot_compute(change, message):
    with pytest.raises(RuntimeError, match=message):
        x, a, b, out = change(*_operands(4, 24, 4, 40))
        lora_rows.lora_rows_(out, x, a, b, 2.0)


@needs_kernels
def test_the_kernel_runs_for_a_few_contiguous_fp32_rows_on_the_default_backend(monkeypatch):
    x, a, b, _ = _operands(lora_rows.MAX_ROWS, 24, 4, 40)
    assert lora_rows.kernel_runs(x, x, a, b)
    many = torch.randn(lora_rows.MAX_ROWS + 1, 24)
    assert not lora_rows.kernel_runs(many, many, a, b)  # a prompt's or a training step's rows: the matmul library
    assert lora_rows.kernel_runs(x.bfloat16(), x.bfloat16(), a, b)  # an fp32 adapter on a bf16 base
    assert not lora_rows.kernel_runs(x.bfloat16(), x.bfloat16(), a.bfloat16(), b.bfloat16())  # bf16 factors
    assert not lora_rows.kernel_runs(x.half(), x.half(), a, b)
    assert not lora_rows.kernel_runs(x.bfloat16(), x, a, b)  # the adapter's input in another dtype than the rows
    strided = torch.randn(24, lora_rows.MAX_ROWS).T
    assert not lora_rows.kernel_runs(strided, strided, a, b)
    for backend in ("aten", "onednn"):  # a library chosen by the user computes everything
        monkeypatch.setenv(BACKEND_ENV, backend)
        assert not lora_rows.kernel_runs(x, x, a, b)


@needs_kernels
@pytest.mark.parametrize("n, tokens, d_in, r, d_out", [(8, 1, 576, 16, 1536), (3, 2, 37, 5, 70), (40, 1, 64, 16, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gathered_kernel_adds_each_sequences_own_adapter(n, tokens, d_in, r, d_out, dtype):
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(n, tokens, d_in, generator=g), torch.randn(n, tokens, d_out, generator=g)
    if dtype == torch.bfloat16:  # the rows and outputs in bf16, the adapters fp32: the result is rounded once
        x, out = x.bfloat16(), out.bfloat16()
    stacked = 4  # fewer adapters than sequences: sequences share slots; slot 0 is the zero slot
    a, b = torch.randn(stacked, r, d_in, generator=g), torch.randn(stacked, d_out, r, generator=g)
    scales = torch.rand(stacked, generator=g) + 0.5
    scales[0] = 0.0
    slots = torch.randint(0, stacked, (n,), generator=g)
    slots[1] = 0  # a sequence without an adapter in this layer: its output stays the base output
    expected = out.double() + torch.bmm(torch.bmm(x.double(), a[slots].double().transpose(1, 2)),
                                        b[slots].double().transpose(1, 2)) * scales[slots].double().view(-1, 1, 1)
    result = out.clone()
    lora_rows.lora_rows_gathered_(result, x, a, b.transpose(1, 2).contiguous(), scales, slots)
    if dtype == torch.float32:
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-4)
    else:  # within the one rounding to bf16
        assert result.dtype == torch.bfloat16
        torch.testing.assert_close(result.double(), expected, rtol=2 ** -8, atol=1e-4)
        upcast = out.float()
        lora_rows.lora_rows_gathered_(upcast, x.float(), a, b.transpose(1, 2).contiguous(), scales, slots)
        assert torch.equal(result, upcast.bfloat16())  # bit for bit the fp32 computation, rounded
    assert torch.equal(result[1], out[1])
    with pytest.raises(RuntimeError, match="shapes do not match"):
        lora_rows.lora_rows_gathered_(result, x, a, b.contiguous(), scales, slots)  # B itself, not B^T
    with pytest.raises(RuntimeError, match="outside the 4 stacked adapters"):
        lora_rows.lora_rows_gathered_(result, x, a, b.transpose(1, 2).contiguous(), scales, slots + stacked)


@needs_kernels
@pytest.mark.parametrize("sequences", [4, 3 * lora_rows.MAX_ROWS])  # also more sequences than the kernel's rows
def test_a_mixed_batch_decoding_step_runs_the_gathered_kernel_and_gives_each_rows_adapter(monkeypatch, sequences):
    torch.manual_seed(0)
    wrapped = get_peft_model(nn.Sequential(nn.Linear(24, 40)),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    wrapped.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    wrapped.eval()
    calls = []
    kernel = lora_rows.lora_rows_gathered_
    monkeypatch.setattr(lora_rows, "lora_rows_gathered_", lambda *args: calls.append(1) or kernel(*args))
    rows = (["default", "other", "__base__", "other"] * sequences)[:sequences]
    x = torch.randn(sequences, 1, 24)
    with torch.no_grad():
        mixed = wrapped(x, adapter_names=rows)
        assert calls == [1]
        torch.testing.assert_close(mixed, rows_run_alone(wrapped, x, rows), rtol=1e-5, atol=1e-5)


def _decoding_layer(alpha: int):
    torch.manual_seed(0)
    wrapped = get_peft_model(nn.Sequential(nn.Linear(24, 40)),
                             LoraConfig(r=4, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False))
    return wrapped.get_base_model()[0].eval()


@needs_kernels
@pytest.mark.parametrize("alpha", [8, 12])
def test_a_decoding_step_of_the_layer_runs_the_kernel_and_gives_the_reference(monkeypatch, alpha):
    layer = _decoding_layer(alpha)
    x = torch.randn(6, 1, 24)  # 6 sequences, one new token each
    calls = _spy_kernels(monkeypatch)
    with torch.no_grad():
        out = layer(x)
        reference = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    assert calls == [torch.float32]
    assert out.shape == (6, 1, 40)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(BACKEND_ENV, "aten")  # the reference's kernels: the reference's bits
    with torch.no_grad():
        assert torch.equal(layer(x), reference)
    assert calls == [torch.float32]


@needs_kernels
def test_decoding_on_a_bf16_base_runs_the_kernel_on_the_fp32_adapter(monkeypatch):
    """bf16 rows, fp32 adapter (how an adapter on a bf16 base is loaded): the update is computed in fp32 by the
    kernel and rounded into the bf16 output once, as PEFT computes it; with autograd the usual path runs."""
    layer = _decoding_layer(8)
    layer.base_layer.to(torch.bfloat16)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 1, 24, dtype=torch.bfloat16)
    calls = _spy_kernels(monkeypatch)
    with torch.no_grad():
        out = layer(x)
        update = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        reference = (layer.base_layer(x).float() + update).to(torch.bfloat16)
    assert calls == [torch.bfloat16] and out.dtype == torch.bfloat16  # the bf16 output itself, no fp32 copy
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=1e-2)  # one bf16 rounding step apart at most
    assert (out.float() - reference.float()).abs().max() <= reference.float().abs().max() * 2 ** -7
    strided = torch.stack([x, x], dim=-1)[..., 0]  # rows the kernel cannot read (not contiguous)
    assert not strided.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(layer(strided), reference, rtol=2e-2, atol=2e-2)  # the bf16 products
    layer(x)  # with autograd: the fused function, not this kernel
    assert len(calls) == 1


@needs_kernels
def test_with_autograd_a_few_rows_give_the_same_output_and_the_reference_gradients(monkeypatch):
    layer = _decoding_layer(8).train()
    x = torch.randn(3, 2, 24, requires_grad=True)
    calls = _spy_kernels(monkeypatch)
    out = layer(x)
    assert calls == [torch.float32]  # the autograd function's forward ran a kernel, and keeps its u for the backward
    with torch.no_grad():
        assert torch.equal(layer(x), out.detach())  # the same kernel with and without autograd
    grad = torch.randn(out.shape)
    out.backward(grad)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    got = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    x.grad = a.grad = b.grad = None
    reference = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    reference.backward(grad)
    for mine, want in zip(got, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d_in, r, d_out, bias", [
    (8, 576, 16, 1536, False),  # SmolLM2's gate projection, a decoded token of batch 8
    (3, 100, 5, 77, True),      # columns split over the threads at no multiple of the vector width
    (9, 17, 16, 16, True),      # one row past a block of 8
    (5, 64, 80, 33, False),     # a rank above the on-stack tile
])
def test_the_one_call_kernel_is_the_base_product_then_the_update_bit_for_bit(dtype, rows, d_in, r, d_out, bias):
    if dtype not in matmul_kernel_dtypes():
        pytest.skip(f"lorakit's few-rows matmul does not run {dtype} here")
    x, a, b, _ = _operands(rows, d_in, r, d_out, lead=(1,))
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(d_out, d_in, generator=g).to(dtype)
    bias_ = torch.randn(d_out, generator=g).to(dtype) if bias else None
    x = x.to(dtype)
    out, u = lora_rows.lora_linear_rows(x, weight, bias_, a, b, 0.75)
    two_calls = torch.ops.lorakit.linear_rows(x, weight, bias_)
    u_two_calls = lora_rows.lora_rows_(two_calls, x, a, b, 0.75)
    assert out.shape == (1, rows, d_out) and out.dtype == dtype and u.shape == (rows, r)
    assert torch.equal(out, two_calls) and torch.equal(u, u_two_calls)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        lora_rows.lora_linear_rows(x, weight, bias_, a, b[:-1].contiguous(), 0.75)


def matmul_kernel_dtypes() -> tuple:
    return tuple(d for d in (torch.float32, torch.bfloat16)
                 if str(d).removeprefix("torch.") in torch.ops.lorakit.linear_rows_dtypes())


@needs_kernels
def test_decoding_runs_the_base_product_and_the_update_in_one_call_where_the_few_rows_matmul_runs(monkeypatch):
    layer = _decoding_layer(8)
    x = torch.randn(6, 1, 24)
    names = []
    for name in ("lora_rows_", "lora_linear_rows"):
        kernel = getattr(lora_rows, name)
        monkeypatch.setattr(lora_rows, name, lambda *args, kernel=kernel, name=name: names.append(name)
                            or kernel(*args))
    with torch.no_grad():
        out = layer(x)
        one_call = matmul.linear_rows_runs(x, layer.base_layer.weight, layer.base_layer.bias)
        assert names == ["lora_linear_rows" if one_call else "lora_rows_"]
        monkeypatch.setattr(fused, "linear_rows_runs", lambda *args: False)  # as where the matmul's rows end
        assert torch.equal(layer(x), out)  # linear, then the update: the same bits
    assert names[1:] == ["lora_rows_"]


def _frozen_tiny_llama():
    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
    return wrapped.eval()


def test_generation_hands_the_head_a_contiguous_input_and_puts_its_forward_back():
    wrapped = _frozen_tiny_llama()
    head = wrapped.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad  # frozen: PyTorch's matmul would run a strided input as a batched matmul
    seen = []
    spy = head.register_forward_hook(lambda module, args, output: seen.append(args[0].is_contiguous()))
    inner = []
    real_linear = matmul.linear  # what the head's forward multiplies with during generation
    matmul.linear = lambda x, w, b: inner.append(x.is_contiguous()) or real_linear(x, w, b)
    ids = torch.randint(5, 200, (3, 7), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            tokens = wrapped.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                      do_sample=False, pad_token_id=0)
    finally:
        matmul.linear = real_linear
    spy.remove()
    assert len(inner) == len(seen) == 3 and all(inner)  # the prompt's last positions, then each decoded token
    assert "forward" not in head.__dict__  # the head's own forward again after the call
    with torch.no_grad():  # the same tokens as the model's own generate
        plain = wrapped.get_base_model().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                  max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, plain)


def test_the_head_on_lorakit_matmul_keeps_values_and_ignores_models_without_a_linear_head():
    model = tiny_llama()
    head = model.get_output_embeddings()
    hidden = torch.randn(3, 5, 32)[:, -1:, :]
    with torch.no_grad():
        own = head(hidden.contiguous())
    handle = head_to_lorakit_matmul(model)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), own, rtol=1e-5, atol=1e-6)  # to fp32 rounding
    training_input = hidden.detach().clone().requires_grad_()
    assert torch.equal(head(training_input), nn.functional.linear(training_input, head.weight, head.bias))
    handle.remove()
    assert "forward" not in head.__dict__
    assert head_to_lorakit_matmul(nn.Sequential(nn.Linear(4, 4))) is None
    wrapped_forward = head.forward  # a forward already replaced (accelerate's hooks do that) is left alone
    head.forward = lambda x: wrapped_forward(x)
    assert head_to_lorakit_matmul(model) is None and "forward" in head.__dict__
