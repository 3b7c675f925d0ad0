"""The training fast path (docs/performance.md): the fused LoRA linear function against the reference module
composition, the chunked LM-head cross-entropy against F.cross_entropy, and the head watch that decides when
the loss may skip the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.eval.metrics import IGNORE_INDEX, summed_token_loss
from lorakit.methods.lora.fused import LoraLinearFunction
from lorakit.ops.cross_entropy import linear_cross_entropy
from lorakit.ops.lm_head import plain_output_head
from lorakit.ops.matmul import BACKEND_ENV
from tests.mixed_batch import rows_run_alone
from tests.tiny import tiny_llama


def _layer(alpha: int, r: int = 4, d_in: int = 24, d_out: int = 40, bias: bool = True, seed: int = 0):
    """A LoRA-wrapped linear with random A and B (B nonzero, so the adapter's term matters)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias))
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False))
    layer = wrapped.get_base_model()[0]
    return wrapped, layer


def _reference(layer, x):
    """The reference LoRA linear: base_layer(x) + lora_B(lora_A(x)) * s, as plain modules (PEFT's formula)."""
    return layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]


def _output_and_grads(layer, x, forward):
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grads = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    return (out.detach(), *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [8, 12])
def test_without_autograd_the_layer_skips_the_autograd_function_with_the_same_bits(monkeypatch, alpha, dtype):
    _, layer = _layer(alpha)
    layer.to(dtype).eval()
    x = torch.randn(3, 5, 24).to(dtype)
    with torch.no_grad():
        calls = []
        original = LoraLinearFunction.forward
        monkeypatch.setattr(LoraLinearFunction, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
        direct = layer(x)
        assert not calls  # no autograd function under no_grad
    with torch.enable_grad():
        through_function = layer(x)
    assert calls  # with autograd, the function
    assert torch.equal(direct, through_function.detach())


@pytest.mark.parametrize("alpha", [8, 12])  # s = 2 (a power of two: scaled on the rank-r side), s = 3 (output side)
def test_fused_fp32_is_bit_for_bit_the_reference_on_the_reference_kernels(monkeypatch, alpha):
    monkeypatch.setenv(BACKEND_ENV, "aten")  # the reference's kernels: then the math must give the same bits
    _, layer = _layer(alpha)
    layer.train()
    x = torch.randn(3, 5, 24)
    fused_calls = []
    original = LoraLinearFunction.forward
    monkeypatch.setattr(LoraLinearFunction, "forward",
                        staticmethod(lambda *a: fused_calls.append(1) or original(*a)))
    fused = _output_and_grads(layer, x, layer)
    assert fused_calls, "the layer did not take the fused path"
    reference = _output_and_grads(layer, x, lambda t: _reference(layer, t))
    for got, want, what in zip(fused, reference, ("output", "dX", "dA", "dB")):
        assert torch.equal(got, want), f"{what} differs from the reference by {(got - want).abs().max()}"


def test_b_gradient_in_the_faster_layout_except_on_the_reference_kernels(monkeypatch):
    """dB = dY^T u as (u^T dY)^T by default (MKL's faster layout: another order of additions), the reference's own
    product, bit for bit, under LORAKIT_MATMUL=aten."""
    from lorakit.methods.lora.fused import _weight_grad_b

    dy, u = torch.randn(300, 40), torch.randn(300, 16)
    fast = _weight_grad_b(dy, u)
    assert fast.shape == (40, 16) and fast.stride() == (1, 40)  # the transpose of a (16, 40) product
    torch.testing.assert_close(fast, dy.T @ u, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(BACKEND_ENV, "aten")
    assert torch.equal(_weight_grad_b(dy, u), dy.T @ u)


def test_fused_fp32_on_the_default_kernels_agrees_to_fp32_rounding():
    _, layer = _layer(8)
    x = torch.randn(3, 5, 24)
    fused = _output_and_grads(layer, x, layer)
    reference = _output_and_grads(layer, x, lambda t: _reference(layer, t))
    for got, want in zip(fused, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_bf16_autocast_returns_fp32_gradients_for_fp32_adapters():
    _, layer = _layer(8)
    x = torch.randn(2, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # the forward's bf16 casts of A and B are what the backward reads (cast once a step), equal to the weights
    saved_a, saved_b = out.grad_fn.saved_tensors[3:5]
    assert saved_a.dtype == saved_b.dtype == torch.bfloat16
    assert torch.equal(saved_a, layer.lora_A["default"].weight.bfloat16())
    assert torch.equal(saved_b, layer.lora_B["default"].weight.bfloat16())
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    reference = _reference(layer, x)
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)


def test_several_adapters_take_the_general_path_with_the_same_result():
    wrapped, layer = _layer(8)
    wrapped.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 24)
    layer.active_adapters = ["default", "other"]
    both = layer(x)
    expected = _reference(layer, x) + layer.lora_B["other"](layer.lora_A["other"](x)) * layer.scaling["other"]
    torch.testing.assert_close(both, expected)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_full_logits_and_skips_ignored(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = nn.Linear(16, 50, bias=with_bias)
    labels = torch.randint(0, 50, (37,))
    labels[::3] = IGNORE_INDEX
    total = linear_cross_entropy(hidden, head.weight, labels, head.bias, chunk_logits=50 * 5)  # 5 tokens a chunk
    total.backward()
    got = (total.detach(), hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = head.weight.grad = None
    expected = F.cross_entropy(head(hidden), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], head.weight.grad, rtol=1e-5, atol=1e-5)
    assert got[1][::3].abs().max() == 0  # an ignored position gets no gradient


@pytest.mark.parametrize("dtype, tokens_a_chunk", [(torch.bfloat16, 24 * 1024), (torch.float32, 8 * 1024)])
def test_the_default_chunk_is_set_by_the_dtype(monkeypatch, dtype, tokens_a_chunk):
    """bf16 logits in chunks of 24M (512 tokens of a 49k vocabulary: a faster head matmul), fp32 in 8M (memory)."""
    from lorakit.ops import cross_entropy

    vocab, tokens = 1024, 24 * 1024 + 1
    rows_per_call = []
    linear = cross_entropy.linear
    monkeypatch.setattr(cross_entropy, "linear",
                        lambda x, w, b=None: rows_per_call.append(x.shape[0]) or linear(x, w, b))
    hidden = torch.randn(tokens, 4, dtype=dtype)
    head = torch.randn(vocab, 4, dtype=dtype)
    with torch.no_grad():
        linear_cross_entropy(hidden, head, torch.randint(0, vocab, (tokens,)))
    assert max(rows_per_call) == tokens_a_chunk and sum(rows_per_call) == tokens


@pytest.mark.parametrize("vocab", [50, 1001])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_kernel_agrees_with_the_operators_and_the_full_logits_loss(monkeypatch, vocab, with_bias, dtype):
    from lorakit.ops import cross_entropy

    if not cross_entropy.kernel_runs(torch.zeros(1, 1, dtype=dtype)):
        pytest.skip("lorakit's cross-entropy kernel cannot be built here")
    torch.manual_seed(0)
    hidden = (torch.randn(37, 16) * 2).to(dtype).requires_grad_(True)
    head = nn.Linear(16, vocab, bias=with_bias).to(dtype)
    labels = torch.randint(0, vocab, (37,))
    labels[0], labels[1], labels[::5] = 0, vocab - 1, IGNORE_INDEX

    def run():
        for tensor in (hidden, head.weight, head.bias):
            if tensor is not None:
                tensor.grad = None
        total = linear_cross_entropy(hidden, head.weight, labels, head.bias, chunk_logits=vocab * 7)
        total.backward()
        grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if with_bias else [])
        return total.detach(), [g.clone() for g in grads]

    calls = []
    kernel = cross_entropy.kernel_runs
    monkeypatch.setattr(cross_entropy, "kernel_runs", lambda logits: calls.append(1) or kernel(logits))
    got, got_grads = run()
    assert calls  # the kernel computed the chunks
    monkeypatch.setattr(cross_entropy, "kernel_runs", lambda logits: False)  # PyTorch's operators
    expected, expected_grads = run()
    full = F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, full.detach(), rtol=1e-5, atol=1e-4)
    # softmax - onehot rounded to bf16 the same way (equal or one step); in fp32 equal to fp32 rounding
    tolerance = (2 ** -7, 1e-3) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    for a, b in zip(got_grads, expected_grads):
        assert a.dtype == b.dtype == dtype and torch.allclose(a.float(), b.float(), *tolerance)
    assert got_grads[0][::5].abs().max() == 0 and got_grads[0].abs().max() > 0


def test_cross_entropy_kernel_rejects_a_target_outside_the_vocabulary():
    from lorakit.ops import cross_entropy

    logits = torch.zeros(2, 10, dtype=torch.bfloat16)
    if not cross_entropy.kernel_runs(logits):
        pytest.skip("lorakit's cross-entropy kernel cannot be built here")
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.ops.lorakit.cross_entropy_rows(logits, torch.tensor([3, 10]), False)


def _batch(vocab: int, seed: int = 0) -> dict:
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a masked prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _full_logits_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def test_loss_from_hidden_states_equals_the_full_logits_loss():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert plain_output_head(model) is not None  # the probe found the logits to be the head's output
    for seed in (0, 1):
        batch = _batch(model.config.vocab_size, seed)
        total, count = summed_token_loss(model, batch)
        assert count == int((F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX).sum())
        torch.testing.assert_close(total, _full_logits_loss(model, batch), rtol=1e-5, atol=1e-4)


def _two_adapter_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    wrapped.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    _train_both(wrapped)
    return wrapped


def _train_both(wrapped) -> None:
    for name, param in wrapped.named_parameters():
        param.requires_grad_("lora_" in name)


def test_mixed_batch_gathered_path_equals_per_row_runs_with_gradients(monkeypatch):
    import lorakit.methods.lora.layer as layer_module

    taken = []
    original = layer_module.mixed_lora_forward
    monkeypatch.setattr(layer_module, "mixed_lora_forward",
                        lambda *a: (lambda out: taken.append(out is not None) or out)(original(*a)))
    wrapped = _two_adapter_model().eval()  # adapter_names is refused in training mode (as PEFT); gradients still flow
    rows = ["default", "__base__", "other", "default"]  # ranks 4 and 2 (zero-padded), and a base row
    x = torch.randn(4, 3, 12)
    mixed = wrapped(x, adapter_names=rows)
    assert taken and all(taken), "the gathered path did not run"
    mixed.square().sum().backward()
    got_grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    wrapped.zero_grad(set_to_none=True)
    expected = rows_run_alone(wrapped, x, rows, after_switch=lambda: _train_both(wrapped))
    expected.square().sum().backward()
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, wrapped.get_parameter(name).grad, rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in got_grads.items() if ".other." in n)  # both adapters were reached


@pytest.mark.parametrize("tokens,base_dtype,adapter_dtype,backend,path", [
    (40, torch.float32, torch.float32, "auto", "gathered"),     # a prompt: each row's adapter gathered, in place
    (3, torch.float32, torch.float32, "auto", "kernel"),        # decoding: lorakit's fp32 kernel
    (3, torch.float32, torch.float32, "aten", "segments"),      # the kernel off: one segment per adapter, in place
    (3, torch.bfloat16, torch.bfloat16, "auto", "segments"),    # bf16 decoding, bf16 adapters
    (3, torch.bfloat16, torch.float32, "auto", "kernel"),       # bf16 decoding, fp32 adapters: the fp32 kernel
    (40, torch.bfloat16, torch.float32, "auto", "gathered"),    # a bf16 prompt, fp32 adapters: in bf16, as one
    (40, torch.bfloat16, torch.bfloat16, "aten", "gathered"),   # the same on bf16 adapters, under aten
    (40, torch.float16, torch.float32, "auto", "segments"),     # fp16 rows, fp32 adapters: in fp32 (range)
])
def test_mixed_batch_without_grad_equals_per_row_runs(monkeypatch, tokens, base_dtype, adapter_dtype, backend, path):
    import lorakit.methods.lora.layer as layer_module
    import lorakit.methods.lora.mixed as mixed_module

    monkeypatch.setenv(BACKEND_ENV, backend)
    taken, paths = [], []
    original = layer_module.mixed_lora_forward
    monkeypatch.setattr(layer_module, "mixed_lora_forward",
                        lambda layer, x, base: (lambda out: taken.append((out is not None, out is base)) or out)(
                            original(layer, x, base)))
    for name, label in (("add_gathered_", "gathered"), ("segmented_delta", "segments")):
        monkeypatch.setattr(mixed_module, name, (lambda fn, label: lambda *a: (lambda r: paths.append(
            (label, r is not False)) or r)(fn(*a)))(getattr(mixed_module, name), label))
    kernel = mixed_module.lora_rows.lora_rows_gathered_
    monkeypatch.setattr(mixed_module.lora_rows, "lora_rows_gathered_",
                        lambda *a: paths.append(("kernel", True)) or kernel(*a))
    wrapped = _two_adapter_model().eval()
    for name, param in wrapped.named_parameters():
        param.data = param.data.to(adapter_dtype if "lora_" in name else base_dtype)
    rows = ["other", "default", "__base__", "default", "other", "other"]  # segments of 3, 2 and 1 rows
    x = torch.randn(len(rows), tokens, 12, dtype=base_dtype)
    with torch.no_grad():
        mixed = wrapped(x, adapter_names=rows)
        expected = rows_run_alone(wrapped, x, rows)
    assert taken and all(ran for ran, _ in taken), "the mixed-batch path did not run"
    in_place = path != "segments" or base_dtype == adapter_dtype  # segments add in place where the dtypes match
    assert all(done_in_place == in_place for _, done_in_place in taken)
    assert {label for label, ran in paths if ran} == {path}
    exact = base_dtype == adapter_dtype == torch.float32
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if exact else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(mixed, expected, **tolerance)


def test_mixed_bf16_decoding_keeps_no_copy_of_the_adapters_per_row(monkeypatch):
    """A mixed batch decoded in bf16 reads each adapter from the stacks: what is kept for the batch is the stacks
    and the segments, never a copy of every row's weights (19.6 MB a row for SmolLM2 at r=16)."""
    import lorakit.methods.lora.layer as layer_module

    kept = []
    original = layer_module.mixed_lora_forward
    monkeypatch.setattr(layer_module, "mixed_lora_forward",
                        lambda layer, x, base: (lambda out: kept.append(dict(layer.routing.layer_state)) or out)(
                            original(layer, x, base)))
    wrapped = _two_adapter_model().eval().to(torch.bfloat16)
    rows = ["default"] * 30 + ["other"] * 2
    with torch.no_grad():
        wrapped(torch.randn(len(rows), 1, 12, dtype=torch.bfloat16), adapter_names=rows)
    assert kept, "the mixed-batch path did not run"
    weights_kept = sum(t.numel() for value in kept[-1].values() if isinstance(value, tuple)  # every layer's
                       for t in value if isinstance(t, torch.Tensor) and t.dim() == 3)
    one_copy = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)  # every adapter, once
    assert 0 < weights_kept <= 2 * one_copy  # the stacks, with the zero slot and rank padding (per-row: 14x)


def test_mixed_batch_without_grad_reuses_the_gathered_weights_within_one_call_only():
    wrapped = _two_adapter_model().eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        first = wrapped(x, adapter_names=["other", "default"])
        with torch.no_grad():  # a changed adapter shows in the next call: nothing outlives the routing
            wrapped.get_base_model()[0].lora_B["other"].weight.mul_(2)
        second = wrapped(x, adapter_names=["other", "default"])
    assert not torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_inference_base_matmul_on_the_fast_kernel_matches_the_base_layer(monkeypatch):
    wrapped, layer = _layer(8)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        with wrapped.disable_adapter():
            fast = layer(x)
            monkeypatch.setenv(BACKEND_ENV, "aten")
            exact = layer(x)
            monkeypatch.delenv(BACKEND_ENV)
        plain = layer.base_layer(x)
    assert torch.equal(exact, plain)  # on the base layer's own kernels: the base layer's bits
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    out = layer(x.requires_grad_(True))  # with autograd the base layer runs itself (gradients flow to x)
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("state", ["one", "merged", "disabled", "two active", "other only", "none held"])
@pytest.mark.parametrize("grad", [False, True])
def test_every_adapter_state_of_a_layer_gives_the_reference_output(monkeypatch, state, grad):
    """LoraLinear.forward picks its path from the adapters' state (reading the containers directly): each state
    against the plain module composition, base_layer(x) + the sum of s B A x over the running adapters."""
    monkeypatch.setenv(BACKEND_ENV, "aten")
    wrapped = _two_adapter_model().eval()
    layer = wrapped.get_base_model()[0]  # holds "default" (s = 2) and "other" (s = 3)
    second = wrapped.get_base_model()[2]  # holds "default" only
    running = {"one": ["default"], "merged": [], "disabled": [], "two active": ["default", "other"],
               "other only": ["other"], "none held": []}[state]
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        expected = layer.base_layer(x) + sum(
            (layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n] for n in running), torch.zeros(()))
    if state == "two active":
        layer.active_adapters = ["default", "other"]
    elif state == "other only":
        layer.active_adapters = ["other"]
    elif state == "merged":
        layer.merge(["default"])
        expected = layer.base_layer(x).detach()  # the merged weight, alone
    elif state == "disabled":
        layer.disabled = True
    elif state == "none held":
        second.active_adapters = ["other"]  # not held by this layer
        x = torch.randn(3, 4, 20)
        layer, expected = second, second.base_layer(x).detach()
    with torch.set_grad_enabled(grad):
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
