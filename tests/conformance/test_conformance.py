"""Every registered method, on every layer type it wraps, through the same checks (DESIGN.md).

A method gets these by registering: the suite asks it for configs through `sample_config`, and runs the
checks its declared capabilities allow (tuner.py: mergeable, mixed_batch); a check a method cannot take is
reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapter_layer import AdapterHolder, AdapterLayer
from lorakit.methods.quant import NF4Linear
from lorakit.registry import registered_methods
from lorakit.tuner import MERGEABLE, MIXED_BATCH

LAYER_TARGETS = {"linear": "lin", "nf4_linear": "qlin", "conv1d": "fused", "embedding": "emb", "conv2d": "conv"}


class ToyModel(nn.Module):
    """Embedding -> Linear -> NF4Linear (quantized base, QLoRA) -> Conv1D (GPT-2 style) -> Conv2d -> head: one
    of each wrappable layer type."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)
        self.qlin = NF4Linear.from_linear(nn.Linear(16, 16), compute_dtype=torch.float32)
        self.fused = Conv1D(24, 16)  # weight (16, 24): stored transposed
        nn.init.normal_(self.fused.weight, std=0.2)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.head = nn.Linear(36, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(input_ids)))  # (B, T, 16)
        h = self.qlin(h)  # (B, T, 16)
        h = self.fused(h)  # (B, T, 24)
        b, t, _ = h.shape
        h = self.conv(h.view(b, t, 2, 12).permute(0, 2, 1, 3))  # (B, 3, T, 12)
        return self.head(h.mean(dim=2).flatten(1))  # (B, 5)


INPUT = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))


def _cases():
    for method in registered_methods():
        for layer_kind, target in LAYER_TARGETS.items():
            module = ToyModel().get_submodule(target)
            marks = () if method.layer_class_for(module) else (pytest.mark.skip(f"{method.name} has no {layer_kind}"),)
            yield pytest.param(method, target, id=f"{method.name}-{layer_kind}", marks=marks)


CASES = list(_cases())


def needs(method, capability: str) -> None:
    if capability not in method.capabilities:
        pytest.skip(f"{method.name} is not {capability.replace('_', '-')}")


def build(method, target, identity=False, seed=0, name="default"):
    torch.manual_seed(seed)
    return lorakit.get_peft_model(ToyModel(), method.sample_config([target], identity=identity), name)


@pytest.mark.parametrize("method,target", CASES)
def test_identity_init_equals_base(method, target):
    base = ToyModel()(INPUT)
    model = build(method, target, identity=True)
    torch.testing.assert_close(model(input_ids=INPUT), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,target", CASES)
def test_random_adapter_changes_output(method, target):
    """Guards the other checks: a random adapter must actually act on the output."""
    model = build(method, target)
    assert not torch.allclose(model(input_ids=INPUT), ToyModel()(INPUT), atol=1e-4)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Copies of every wrapped base layer's tensors, its weight as a dense tensor (`dense_base_weight()`: a
    quantized base is dequantized, and merging makes it dense)."""
    out = {}
    for path, layer in model.get_base_model().named_modules():
        if isinstance(layer, AdapterLayer):
            out[f"{path}.weight"] = layer.dense_base_weight().detach().clone()
            out.update({f"{path}.{k}": v.detach().clone() for k, v in layer.base_layer.named_parameters()
                        if k != "weight"})
    return out


@pytest.mark.parametrize("method,target", CASES)
@pytest.mark.filterwarnings("ignore:merging into an NF4 layer")
def test_merge_unmerge_restores_weights_and_outputs(method, target):
    needs(method, MERGEABLE)
    model = build(method, target)
    before = base_weights(model)
    unmerged_out = model(input_ids=INPUT)
    model.merge_adapter()
    merged_weights = base_weights(model)
    assert merged_weights.keys() == before.keys()
    assert any(not torch.equal(before[k], merged_weights[k]) for k in before), "merge changed no weight"
    torch.testing.assert_close(model(input_ids=INPUT), unmerged_out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    after = base_weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=INPUT), unmerged_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,target", CASES)
@pytest.mark.filterwarnings("ignore:merging into an NF4 layer")
def test_merge_and_unload_gives_plain_model_with_same_output(method, target):
    needs(method, MERGEABLE)
    model = build(method, target)
    expected = model(input_ids=INPUT)
    plain = model.merge_and_unload()
    assert type(plain) is ToyModel
    assert not any(isinstance(m, AdapterHolder) for m in plain.modules())
    torch.testing.assert_close(plain(INPUT), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,target", CASES)
def test_save_load_round_trip_is_exact(method, target, tmp_path):
    model = build(method, target, seed=3)
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(ToyModel(), str(tmp_path))
    saved, restored = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == restored.keys() and saved
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    assert torch.equal(loaded(input_ids=INPUT), model(input_ids=INPUT))


@pytest.mark.parametrize("method,target", CASES)
def test_adapters_are_isolated(method, target):
    model = build(method, target, seed=1, name="a")
    torch.manual_seed(2)
    model.add_adapter("b", method.sample_config([target], identity=False))
    out_a = model(input_ids=INPUT)
    with torch.no_grad():
        for holder in (m for m in model.modules() if isinstance(m, AdapterHolder)):
            for tensor in holder.adapter_tensors("b").values():
                tensor.add_(torch.randn_like(tensor))
    torch.testing.assert_close(model(input_ids=INPUT), out_a, atol=0, rtol=0)
    model.set_adapter("b")
    assert not torch.allclose(model(input_ids=INPUT), out_a, atol=1e-4)
    model.set_adapter("a")
    model.delete_adapter("b")
    torch.testing.assert_close(model(input_ids=INPUT), out_a, atol=0, rtol=0)


@pytest.mark.parametrize("method,target", CASES)
def test_mixed_batch_equals_per_row_runs(method, target):
    needs(method, MIXED_BATCH)
    model = build(method, target, seed=1, name="a")
    torch.manual_seed(2)
    model.add_adapter("b", method.sample_config([target], identity=False))
    names = ["a", "b", "__base__", "a"]
    mixed = model(input_ids=INPUT, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=INPUT[row:row + 1])
        else:
            model.set_adapter(name)
            alone = model(input_ids=INPUT[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,target", CASES)
def test_only_active_adapter_parameters_train(method, target):
    model = build(method, target, seed=1, name="a")
    model.add_adapter("b", method.sample_config([target], identity=False))
    saved = model.tuners["a"].state_tensors()  # what adapter "a" saves; it trains a subset of it (LoRA-FA: B only)
    live = {id(t) for t in saved.values() if isinstance(t, nn.Parameter) and t.requires_grad}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == live and trainable
    assert not {id(t) for t in model.tuners["b"].state_tensors().values()} & trainable
    model(input_ids=INPUT).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in live), name
