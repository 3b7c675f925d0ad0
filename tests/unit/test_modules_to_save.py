"""modules_to_save copies stand in for the module they wrap: attributes read through to the copy the forward
runs, keyword-only forwards work, and mixed-adapter batches route rows to each adapter's copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.modules_to_save import ModulesToSaveWrapper
from tests.mixed_batch import rows_run_alone


class KeywordHead(nn.Module):
    """A head whose forward takes keyword arguments only."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, *, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.proj(hidden_states) * scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(4, 6)
        self.lin1 = nn.Linear(6, 3)
        self.head = KeywordHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin0(x))
        # lin1's input passed by keyword, as `input=` (nn.Linear's parameter name); the head takes keywords only
        return self.lin1(input=h) + self.head(hidden_states=h, scale=2.0)


def two_adapters():
    """Adapters "a" and "b" with their own trained copies of lin1 and head (perturbed apart); "a" active."""
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1", "head"]), "a")
    model.add_adapter("b", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1", "head"]))
    with torch.no_grad():
        for i, name in enumerate(("a", "b")):
            for wrapper in (m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)):
                for p in wrapper.modules_to_save[name].parameters():
                    p.add_(i + 1.0)
    return model.eval()


def test_attributes_read_through_to_the_active_copy():
    model = two_adapters()
    lin1 = model.get_base_model().lin1
    assert isinstance(lin1, ModulesToSaveWrapper)
    assert lin1.weight is lin1.modules_to_save["a"].weight
    assert (lin1.in_features, lin1.out_features) == (6, 3)
    head = model.get_base_model().head
    assert head.proj is head.modules_to_save["a"].proj
    model.set_adapter("b")
    assert lin1.weight is lin1.modules_to_save["b"].weight
    with model.disable_adapter():
        assert lin1.weight is lin1.original_module.weight
    assert lin1.weight is lin1.modules_to_save["b"].weight
    assert not hasattr(lin1, "no_such_attribute")
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = lin1.no_such_attribute


def test_attributes_of_an_adapter_without_a_copy_are_the_original_s():
    """The forward runs the original module when the active adapter has no copy here; attributes follow it."""
    model = get_peft_model(Net(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]), "a")
    model.add_adapter("plain", LoraConfig(target_modules=["lin0"]))
    model.set_adapter("plain")
    lin1 = model.get_base_model().lin1
    assert lin1.weight is lin1.original_module.weight


def test_keyword_only_forwards_and_inputs_passed_by_keyword():
    model = two_adapters()
    x = torch.randn(5, 4)
    net = model.get_base_model()
    h = torch.relu(net.lin0(x))
    expected = net.lin1.modules_to_save["a"](h) + net.head.modules_to_save["a"](hidden_states=h, scale=2.0)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(net.head(hidden_states=h), net.head.modules_to_save["a"](hidden_states=h))
    with model.disable_adapter():
        torch.testing.assert_close(net.head(hidden_states=h), net.head.original_module(hidden_states=h))


def test_mixed_batch_with_keyword_inputs_equals_per_row_runs():
    model = two_adapters()
    x = torch.randn(4, 4)
    names = ["b", "a", "__base__", "b"]
    mixed = model(x, adapter_names=names)
    torch.testing.assert_close(mixed, rows_run_alone(model, x, names))
    assert not torch.allclose(mixed[0], mixed[1])  # the copies differ, so the check above could fail


def test_mixed_batch_without_a_tensor_argument_is_a_clear_error():
    model = two_adapters()
    head = model.get_base_model().head
    with pytest.raises(TypeError, match="needs a batched tensor argument"):
        with model._mixed_batch(["a"], (), {}):
            head(scale=2.0)


def test_the_wrapper_deep_copies():
    model = two_adapters()
    clone = copy.deepcopy(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(clone(x), model(x))
