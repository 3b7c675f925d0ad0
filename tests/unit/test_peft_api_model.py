"""PeftModel's PEFT surface: keyword arguments, tuner-level calls through base_model, adapter switching and deletion,
enabling/disabling, PEFT's warnings and errors, status reports."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.model_status import TunerLayerStatus, TunerModelStatus


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


X = torch.randn(4, 6)


def random_config(**kw):
    return LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, **kw)


@pytest.fixture
def two():
    model = get_peft_model(MLP(), random_config(), "a")
    model.add_adapter("b", random_config(r=4))
    return model


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_get_peft_model_takes_peft_keyword_arguments():
    config = random_config()
    with pytest.warns(UserWarning, match="overwriting with revision v2"):
        config.revision = "v1"
        model = get_peft_model(MLP(), config, mixed=True, autocast_adapter_dtype=False, revision="v2",
                               low_cpu_mem_usage=True)
    assert isinstance(model, PeftModel) and config.revision == "v2"


def test_autocast_adapter_dtype():
    base = MLP().to(torch.bfloat16)
    kept = get_peft_model(copy.deepcopy(base), random_config(), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}
    cast = get_peft_model(base, random_config())
    assert {p.dtype for n, p in cast.named_parameters() if "lora_" in n} == {torch.float32}
    cast.add_adapter("other", random_config(), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in cast.named_parameters() if ".other." in n} == {torch.bfloat16}


def test_set_adapter_inference_mode_freezes_the_active_adapter(two):
    two.set_adapter("b")
    assert trainable(two) and all(".b." in n for n in trainable(two))
    two.set_adapter("b", inference_mode=True)
    assert not trainable(two)


def test_base_model_answers_tuner_level_calls(two):
    two.base_model.set_adapter(["a", "b"])
    assert two.active_adapters == ["a", "b"] and two.base_model.active_adapters == ["a", "b"]
    assert two.base_model.targeted_module_names == ["lin0", "lin1"]
    assert set(two.base_model.peft_config) == {"a", "b"} and two.base_model.prefix == "lora_"
    two.base_model.merge_adapter()
    assert two.get_model_status().merged_adapters == ["a", "b"]
    two.base_model.unmerge_adapter()
    assert two.base_model.model is two.get_base_model()


def test_deleting_the_active_adapter_activates_another(two):
    with pytest.warns(UserWarning, match="Adapter a was active which is now deleted. Setting active adapter to b"):
        two.delete_adapter("a")
    assert two.active_adapters == ["b"] and trainable(two)
    two.delete_adapter("b")
    assert two.active_adapters == [] and two.peft_config == {}
    assert isinstance(two.base_model.model.lin0, nn.Linear)


def test_deleting_one_of_two_active_adapters_keeps_the_other(two):
    two.set_adapter(["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two.delete_adapter("b")
    assert two.active_adapters == ["a"] and two.active_adapter == "a"


def test_a_merged_adapter_cannot_be_deleted(two):
    two.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a'\] while they are merged"):
        two.delete_adapter("a")


def test_disable_and_enable_adapter_layers(two):
    with torch.no_grad():
        base = two.get_base_model().lin2(torch.relu(two.get_base_model().lin1.base_layer(
            torch.relu(two.get_base_model().lin0.base_layer(X)))))
        adapted = two(X)
        two.disable_adapter_layers()
        assert torch.allclose(two(X), base) and not two.has_active_enabled_adapter
        assert two.get_model_status().enabled is False
        two.enable_adapter_layers()
        assert torch.allclose(two(X), adapted)


def test_disabling_with_a_bias_warns():
    model = get_peft_model(MLP(), random_config(bias="all"))
    with pytest.warns(UserWarning, match="disabling adapter layers with bias configured to be 'all'"):
        model.disable_adapter_layers()


def test_merge_warnings(two):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two.merge_adapter(["a"])
    with pytest.warns(UserWarning, match="Already following adapters were merged a. You are now additionally merging b"):
        two.merge_adapter(["b"])
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        two.merge_adapter(["a", "b"])
    two.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do"):
        two.unmerge_adapter()
    with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
        two.merge_adapter("a")


def test_set_adapter_on_a_merged_model_unmerges_with_a_warning(two):
    two.merge_adapter()
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first"):
        two.set_adapter("b")
    assert two.get_model_status().merged_adapters == []


def test_adapter_names_errors(two):
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        two.train()(X, adapter_names=["a"] * 4)
    two.eval()
    with pytest.raises(ValueError, match="non-existing adapter"):
        two(X, adapter_names=["a", "zz", "a", "a"])
    two.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        two(X, adapter_names=["a"] * 4)


def test_a_second_adapter_with_a_bias_is_refused():
    model = get_peft_model(MLP(), random_config(bias="lora_only"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", random_config(bias="all"))
    assert list(model.peft_config) == ["default"]


def test_duplicate_names_and_unknown_adapters_use_peft_messages(two):
    with pytest.raises(ValueError, match="Adapter with name 'a' already exists"):
        two.add_adapter("a", random_config())
    with pytest.raises(ValueError, match="Adapter zz not found"):
        two.set_adapter("zz")
    with pytest.raises(ValueError, match="Adapter zz does not exist"):
        two.delete_adapter("zz")


def test_set_requires_grad(two):
    two.set_requires_grad("b")
    assert any(".b." in n for n in trainable(two)) and any(".a." in n for n in trainable(two))
    two.set_requires_grad(["a", "b"], requires_grad=False)
    assert not trainable(two)


def test_status_reports(two):
    layers = two.get_layer_status()
    assert [s.name for s in layers] == ["model.lin0", "model.lin1"] and all(isinstance(s, TunerLayerStatus) for s in layers)
    assert layers[0].module_type == "lora.Linear" and layers[0].available_adapters == ["a", "b"]
    assert layers[0].requires_grad == {"a": True, "b": False}
    status = two.get_model_status()
    assert isinstance(status, TunerModelStatus)
    assert status.adapter_model_type == "LoraModel" and status.peft_types == {"a": "LORA", "b": "LORA"}
    assert status.active_adapters == ["a"] and status.num_adapter_layers == 2 and status.enabled is True
    two.get_base_model().lin0.disabled = True
    assert two.get_model_status().enabled == "irregular"
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with two.disable_adapter():
            pass


def test_peft_attributes(two):
    assert two.peft_type == "LORA" and two.active_peft_config is two.peft_config["a"]
    assert two.modules_to_save is None and two.targeted_parameter_names == []
    assert "adapter_names" in two.special_peft_forward_args


def test_a_copy_is_independent(two):
    other = copy.deepcopy(two)
    other.base_model.set_adapter("b")
    assert two.active_adapters == ["a"] and other.active_adapters == ["b"]


def test_no_matching_module_errors_use_peft_classes_and_sentences():
    from lorakit import NoMatchingPeftModuleError, PeftError
    with pytest.raises(NoMatchingPeftModuleError, match="Target modules .* not found in the base model"):
        get_peft_model(MLP(), LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="All modules were excluded"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1", "lin2"], exclude_modules=["lin0", "lin1", "lin2"]))
    with pytest.raises(PeftError, match="No modules were targeted for adaptation"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "nope"], exclude_modules=["lin0"]))
    with pytest.warns(UserWarning, match="no modules were excluded"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], exclude_modules=["nope"]))


def test_targeted_module_names_follow_the_adapters_order():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin1"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0", "lin1"]))
    assert model.base_model.targeted_module_names == ["lin1", "lin0"]


def test_modules_to_save_refuses_containers():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.heads = nn.Linear(6, 8), nn.ModuleList([nn.Linear(8, 2)])

    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
        get_peft_model(Holder(), LoraConfig(target_modules=["lin0"], modules_to_save=["heads"]))


def test_get_peft_model_names_the_model_it_adapts():
    config = LoraConfig(target_modules=["lin0"], base_model_name_or_path="mine")
    with pytest.warns(UserWarning, match="was renamed from 'mine' to 'None'"):
        get_peft_model(MLP(), config)
    assert config.base_model_name_or_path is None
    named = MLP()
    named.name_or_path = "org/model"
    assert get_peft_model(named, LoraConfig(target_modules=["lin0"])).peft_config["default"].base_model_name_or_path \
        == "org/model"


def test_layers_answer_to_peft_attribute_names(two):
    layer = two.base_model.model.lin0
    assert {"lora_A", "lora_B"} <= set(layer.adapter_layer_names)
    assert "scaling" in layer.other_param_names and "r" in layer.other_param_names
    two.delete_adapter("b")
    assert all("b" not in getattr(layer, attr) for attr in layer.adapter_layer_names + layer.other_param_names)


def test_convolution_layers_are_named_by_their_dimension():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert repr(get_peft_model(conv, LoraConfig(target_modules=["0"])).base_model.model[0]).startswith("lora.Conv2d(")


def test_a_mixed_batch_through_a_copy_returning_a_tuple_is_refused():
    class WithGru(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.gru = nn.Linear(6, 6), nn.GRU(6, 6, batch_first=True)

        def forward(self, x):
            return self.gru(self.lin0(x))[0]

    model = get_peft_model(WithGru(), LoraConfig(target_modules=["lin0"], modules_to_save=["gru"]), "a").eval()
    model.add_adapter("b", LoraConfig(target_modules=["lin0"], modules_to_save=["gru"]))
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules"):
        model(torch.randn(2, 3, 6), adapter_names=["a", "b"])
