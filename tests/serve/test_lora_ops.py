"""The serving LoRA layer: one base matmul, each row's own low-rank update from stacked, zero-padded adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig
from lorakit.methods.lora.layer import LoraLinear
from lorakit.ops.matmul import linear
from lorakit.serve.lora_ops import KERNEL_CHOICES, BatchAdapters, ServingLoraLinear, wrap_linear


def lora_layer(base: nn.Module, specs: dict[str, dict]) -> LoraLinear:
    """lorakit's training layer with several adapters (random A and B), the reference."""
    layer = LoraLinear(base)
    for name, spec in specs.items():
        layer.add_adapter(name, LoraConfig(init_lora_weights=False, **spec), "proj")
        layer.lora_A[name].weight.data.normal_()
        layer.lora_B[name].weight.data.normal_()
    return layer


def load_into(serving: ServingLoraLinear, reference: LoraLinear, slots: dict[str, int]) -> None:
    for name, slot in slots.items():
        a = reference.lora_A[name].weight.data
        b = reference.lora_B[name].weight.data * reference.scaling[name]
        serving.write_slot(slot, a, b)


SPECS = {"r2": dict(r=2, lora_alpha=4), "r8": dict(r=8, lora_alpha=8),
         "rs16": dict(r=16, lora_alpha=4, use_rslora=True)}


@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
@pytest.mark.parametrize("tokens", [1, 5])  # a decoding pass, a prefill pass
@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
def test_each_row_gets_its_own_adapter(kernel, tokens, base_type):
    torch.manual_seed(0)
    base = nn.Linear(12, 20).double() if base_type == "linear" else Conv1D(20, 12).double()
    reference = lora_layer(base, SPECS)
    batch = BatchAdapters(kernel)
    serving = ServingLoraLinear(base, num_slots=4, batch=batch)
    slots = {"r2": 1, "rs16": 2, "r8": 3}
    load_into(serving, reference, slots)
    rows = ["r8", None, "r2", "rs16", "r8", None]
    x = torch.randn(len(rows), tokens, 12, dtype=torch.float64)
    batch.set([slots[r] if r else 0 for r in rows], tokens, x.device)
    out = serving(x)
    for i, name in enumerate(rows):
        with torch.no_grad():
            expected = base(x[i]) if name is None else base(x[i]) + reference.adapter_output(name, x[i], base(x[i]))
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


def test_the_kernel_is_chosen_per_pass_and_segments_group_rows_by_adapter():
    batch = BatchAdapters("auto")
    batch.set([0, 0, 0], 1, torch.device("cpu"))
    assert batch.add_lora is None  # base rows only: no low-rank work at all
    batch.set([0, 2, 3, 2, 2, 0, 3], 7, torch.device("cpu"))
    assert batch.add_lora.__name__ == "gathered_lora" and batch.segments is None  # prefill
    batch.set([0, 3, 2, 3, 3, 0, 2], 1, torch.device("cpu"))
    assert batch.add_lora.__name__ == "rows_kernel_lora"  # decoding: lorakit's kernel, the segments where it cannot
    assert batch.slot_scales(4).tolist() == [0.0, 1.0, 1.0, 1.0]  # the base slot skipped, s folded into B
    segments = batch.segments
    assert segments.slots.tolist() == [0, 2, 3] and segments.size == 3  # in slot order
    assert segments.rows.tolist() == [0, 5, 0, 2, 6, 2, 1, 3, 4]  # short segments repeat their first row
    assert segments.places.tolist() == [0, 6, 3, 7, 8, 1, 4]
    batch.clear()
    assert batch.add_lora is None and batch.segments is None
    with pytest.raises(ValueError, match="kernel must be one of"):
        BatchAdapters("fastest")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_takes_lorakits_kernel_on_fp32_stacks_and_the_segments_elsewhere(monkeypatch, dtype):
    """A bf16 base keeps its stacks in fp32 on the CPU, so that its decoding passes take the rows kernel too."""
    from lorakit.ops import lora_rows
    from lorakit.ops.cpu_extension import kernels_available

    if not kernels_available():
        pytest.skip("lorakit's CPU kernels cannot be built here")
    torch.manual_seed(0)
    base = nn.Linear(12, 20).to(dtype)
    reference = lora_layer(base, SPECS)
    calls = []
    kernel = lora_rows.lora_rows_gathered_
    monkeypatch.setattr(lora_rows, "lora_rows_gathered_", lambda *args: calls.append(1) or kernel(*args))
    outputs = {}
    for choice in ("rows", "segmented"):
        batch = BatchAdapters(choice)
        serving = ServingLoraLinear(base, num_slots=4, batch=batch)
        load_into(serving, reference, {"r2": 1, "rs16": 2, "r8": 3})
        x = torch.randn(6, 1, 12, dtype=dtype, generator=torch.Generator().manual_seed(1))
        batch.set([3, 0, 1, 2, 3, 0], 1, x.device)
        with torch.no_grad():
            outputs[choice] = serving(x)
    assert calls == [1] and serving.lora_A.dtype == serving.lora_B.dtype == torch.float32
    with torch.no_grad():
        base_out = linear(x, base.weight, base.bias)  # the serving layer's base product (lorakit's kernels)
    if dtype == torch.float32:
        torch.testing.assert_close(outputs["rows"], outputs["segmented"], rtol=1e-5, atol=1e-5)
    else:  # the kernel: the update in fp32 from the fp32 stacks, rounded into the bf16 output once
        a, b = serving.lora_A.double(), serving.lora_B.double()
        slots = torch.tensor([3, 0, 1, 2, 3, 0])
        update = torch.bmm(torch.bmm(x.double(), a[slots].transpose(1, 2)), b[slots])
        exact = base_out.double() + update
        torch.testing.assert_close(outputs["rows"].double(), exact, rtol=2 ** -8, atol=1e-6)
        # the segments compute in bf16 (the stacks cast, u rounded): further from it
        assert (outputs["rows"].double() - exact).abs().max() <= (outputs["segmented"].double() - exact).abs().max()
        torch.testing.assert_close(base_out, base(x), rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-5)
    assert not torch.equal(outputs["rows"][0], base_out[0])  # an adapter's row changed; a base row did not
    assert torch.equal(outputs["rows"][1], base_out[1]) and torch.equal(outputs["rows"][5], base_out[5])


def test_ranks_grow_in_place_and_a_slot_is_cleared_when_rewritten():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    reference = lora_layer(base, {"small": dict(r=2, lora_alpha=2), "big": dict(r=8, lora_alpha=8)})
    batch = BatchAdapters()
    serving = ServingLoraLinear(base, num_slots=3, batch=batch)
    assert serving.max_rank == 0
    load_into(serving, reference, {"small": 1})
    assert serving.max_rank == 2
    load_into(serving, reference, {"big": 2})
    assert serving.max_rank == 8  # zero-padded: slot 1 still computes "small" exactly
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    batch.set([1, 2], 3, x.device)
    with torch.no_grad():
        expected = [base(x[0]) + reference.adapter_output("small", x[0], base(x[0])),
                    base(x[1]) + reference.adapter_output("big", x[1], base(x[1]))]
    torch.testing.assert_close(serving(x), torch.stack(expected))
    load_into(serving, reference, {"small": 2})  # "big" evicted from slot 2: its extra rank columns must go
    assert torch.count_nonzero(serving.lora_A[2, 2:]) == 0 and torch.count_nonzero(serving.lora_B[2, 2:]) == 0
    serving.write_slot(1, None, None)
    assert torch.count_nonzero(serving.lora_A[1]) == 0


def test_wrap_linear_replaces_the_module_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    batch = BatchAdapters()
    wrapper = wrap_linear(model, "0", 2, batch)
    assert model[0] is wrapper and isinstance(wrapper.base_layer, nn.Linear)
    assert wrap_linear(model, "0", 2, batch) is wrapper
    # buffers, not parameters, and not persistent: never trained, never saved with the model
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not any("lora" in k for k in model.state_dict())
    with pytest.raises(TypeError, match="nn.Linear or Conv1D"):
        ServingLoraLinear(nn.Embedding(3, 4), 2, batch)
