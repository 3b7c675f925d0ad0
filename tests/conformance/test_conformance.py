"""Every registered method, on every layer type it wraps, through the same checks (DESIGN.md).

A method gets these by registering: the suite asks it for configs through `sample_configs` (one per variant
of the method that can wrap the layer: LoRA's plain, DoRA, PiSSA, OLoRA), and runs the checks its declared
capabilities allow (tuner.py: mergeable, mixed_batch) and its layers allow (a layer's merge_refusal: LoRA on a
grouped convolution); a check a method cannot take is reported as skipped with the reason, never silently
dropped. The layer types live in two toy models (LAYER_TARGETS). Random (identity=False) adapters also get their trainable tensors
perturbed, as training would, so variants whose init is always the identity are tested non-trivially.
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

class ToyModel(nn.Module):
    """Embedding -> Linear -> NF4Linear (quantized base, QLoRA) -> Conv1D (GPT-2 style) -> Conv2d -> head: one
    of each linear-like layer type, and a convolution."""

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


class ConvAttentionModel(nn.Module):
    """Embedding -> MultiheadAttention (sequence first, torch's default) -> Conv1d over the sequence -> grouped
    Conv2d -> Conv3d -> head: the attention and the other convolution layer types. Input: (B, 6) token ids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, num_heads=2)
        self.seq_conv = nn.Conv1d(16, 8, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)  # 2 divides the sample configs' r
        self.vol_conv = nn.Conv3d(3, 2, kernel_size=2)
        self.head = nn.Linear(10, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids).transpose(0, 1)  # (T, B, 16)
        h = self.attn(h, h, h)[0].transpose(0, 1)  # (B, T, 16)
        h = torch.tanh(self.seq_conv(h.transpose(1, 2)))  # (B, 8, T)
        b, _, t = h.shape
        h = self.grouped(h.view(b, 4, 2, t))  # (B, 6, 2, T)
        h = self.vol_conv(h.view(b, 3, 2, 2, t))  # (B, 2, 1, 1, T - 1)
        return self.head(h.flatten(1))  # (B, 5)


# the expected warning of an adapter on a grouped convolution (it cannot be merged; the merge checks skip it)
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")

# layer kind -> (a model holding one, its module name)
LAYER_TARGETS = {
    "linear": (ToyModel, "lin"), "nf4_linear": (ToyModel, "qlin"), "gpt2_conv1d": (ToyModel, "fused"),
    "embedding": (ToyModel, "emb"), "conv2d": (ToyModel, "conv"),
    "mha": (ConvAttentionModel, "attn"), "conv1d": (ConvAttentionModel, "seq_conv"),
    "grouped_conv2d": (ConvAttentionModel, "grouped"), "conv3d": (ConvAttentionModel, "vol_conv"),
}

INPUT = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))


class Case:
    """One method variant on one layer type (the module `target` of a `model_cls`)."""

    def __init__(self, method, model_cls, target: str, variant: str) -> None:
        self.method, self.model_cls, self.target, self.variant = method, model_cls, target, variant

    def config(self, identity: bool):
        base_layer = self.model_cls().get_submodule(self.target)
        return self.method.sample_configs([self.target], identity, base_layer)[self.variant]


def _cases():
    for method in registered_methods():
        for layer_kind, (model_cls, target) in LAYER_TARGETS.items():
            module = model_cls().get_submodule(target)
            if not method.layer_class_for(module):
                yield pytest.param(Case(method, model_cls, target, "plain"), id=f"{method.name}-{layer_kind}",
                                   marks=pytest.mark.skip(f"{method.name} has no {layer_kind}"))
                continue
            for variant in method.sample_configs([target], True, module):
                label = method.name if variant == "plain" else f"{method.name}[{variant}]"
                yield pytest.param(Case(method, model_cls, target, variant), id=f"{label}-{layer_kind}")


CASES = list(_cases())


def needs(case: Case, capability: str) -> None:
    if capability not in case.method.capabilities:
        pytest.skip(f"{case.method.name} is not {capability.replace('_', '-')}")


def needs_mergeable_layers(model) -> None:
    """Skip, with the layer's reason, when a wrapped layer cannot merge (LoRA on a grouped convolution)."""
    for layer in model.modules():
        if isinstance(layer, AdapterLayer) and layer.merge_refusal():
            pytest.skip(layer.merge_refusal())


@torch.no_grad()
def perturb(model, name: str, seed: int) -> None:
    """Noise on the adapter's trainable tensors (what training would change, but more)."""
    gen = torch.Generator().manual_seed(seed)
    for tensor in model.tuners[name].state_tensors().values():
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            tensor.add_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * 0.1)


def build(case: Case, identity=False, seed=0, name="default"):
    torch.manual_seed(seed)
    model = lorakit.get_peft_model(case.model_cls(), case.config(identity), name)
    if not identity:
        perturb(model, name, seed)
    return model


def add(model, case: Case, name: str, seed: int) -> None:
    """A second, random adapter of the same case (inactive, like add_adapter's)."""
    torch.manual_seed(seed)
    previous = model.active_adapters
    model.add_adapter(name, case.config(identity=False))
    model.set_adapter(name)  # only active adapters' tensors are trainable, hence perturbed
    perturb(model, name, seed)
    model.set_adapter(previous)


@pytest.mark.parametrize("case", CASES)
def test_identity_init_equals_base(case):
    base = case.model_cls()(INPUT)
    model = build(case, identity=True)
    torch.testing.assert_close(model(input_ids=INPUT), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_random_adapter_changes_output(case):
    """Guards the other checks: a random adapter must actually act on the output."""
    model = build(case)
    assert not torch.allclose(model(input_ids=INPUT), case.model_cls()(INPUT), atol=1e-4)


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


@pytest.mark.parametrize("case", CASES)
@pytest.mark.filterwarnings("ignore:merging into an NF4 layer")
def test_merge_unmerge_restores_weights_and_outputs(case):
    needs(case, MERGEABLE)
    model = build(case)
    needs_mergeable_layers(model)
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


@pytest.mark.parametrize("case", CASES)
@pytest.mark.filterwarnings("ignore:merging into an NF4 layer")
def test_merge_and_unload_gives_plain_model_with_same_output(case):
    needs(case, MERGEABLE)
    model = build(case)
    needs_mergeable_layers(model)
    expected = model(input_ids=INPUT)
    plain = model.merge_and_unload()
    assert type(plain) is case.model_cls
    assert not any(isinstance(m, AdapterHolder) for m in plain.modules())
    torch.testing.assert_close(plain(INPUT), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip_is_exact(case, tmp_path):
    model = build(case, seed=3)
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(case.model_cls(), str(tmp_path))
    saved, restored = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == restored.keys() and saved
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    assert torch.equal(loaded(input_ids=INPUT), model(input_ids=INPUT))


@pytest.mark.parametrize("case", CASES)
def test_adapters_are_isolated(case):
    model = build(case, seed=1, name="a")
    add(model, case, "b", seed=2)
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


@pytest.mark.parametrize("case", CASES)
def test_mixed_batch_equals_per_row_runs(case):
    needs(case, MIXED_BATCH)
    model = build(case, seed=1, name="a")
    add(model, case, "b", seed=2)
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


@pytest.mark.parametrize("case", CASES)
def test_only_active_adapter_parameters_train(case):
    model = build(case, seed=1, name="a")
    add(model, case, "b", seed=2)
    saved = model.tuners["a"].state_tensors()  # what adapter "a" saves; it trains a subset of it (LoRA-FA: B only)
    live = {id(t) for t in saved.values() if isinstance(t, nn.Parameter) and t.requires_grad}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == live and trainable
    assert not {id(t) for t in model.tuners["b"].state_tensors().values()} & trainable
    model(input_ids=INPUT).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in live), name


@pytest.mark.parametrize("case", CASES)
def test_reset_adapter_restores_the_identity_init_in_place(case):
    """Trainer strategies (ReLoRA) restart an adapter through Tuner.reset_adapter: the same tensor objects (an
    optimizer holds them), filled so that the adapter is the identity again on the current base."""
    if not case.method.can_reset():
        pytest.skip(f"{case.method.name} layers do not implement reset_adapter")
    model = build(case, identity=True)
    with model.disable_adapter():
        base_out = model(input_ids=INPUT)  # PiSSA/OLoRA rewrote the base into a residual: compare with it
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for param in tensors.values():
            param.add_(torch.randn_like(param))
    assert not torch.allclose(model(input_ids=INPUT), base_out, atol=1e-4)
    model.tuners["default"].reset_adapter()
    torch.testing.assert_close(model(input_ids=INPUT), base_out, atol=1e-5, rtol=0)
    assert all(p is tensors[n] for n, p in model.named_parameters() if p.requires_grad)
