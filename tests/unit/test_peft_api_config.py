"""Config semantics PEFT users rely on: mutable configs validated again when used, PEFT's enums, every field of PEFT
0.21's LoraConfig accepted at its default, unknown keys from newer PEFT versions warned about and ignored."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from lorakit import AdaLoraConfig, LoraConfig, PeftConfig, PeftType, TaskType, VeraConfig, get_peft_model
from lorakit.methods.lora.config import UNSUPPORTED_LORA_OPTIONS


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def test_fields_can_be_assigned_and_the_change_takes_effect():
    config = LoraConfig(target_modules=["lin0"])
    config.r = 4
    config.lora_alpha = 16
    model = get_peft_model(MLP(), config)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (4, 6)
    assert model.base_model.model.lin0.scaling["default"] == 4.0


def test_a_bad_value_assigned_later_is_refused_when_the_config_is_used(tmp_path):
    config = LoraConfig(target_modules=["lin0"])
    config.lora_dropout = 1.5
    with pytest.raises(ValueError, match=r"LoraConfig.lora_dropout must be in \[0.0, 1.0\), got 1.5"):
        get_peft_model(MLP(), config)
    config.lora_dropout = 0.0
    config.bias = "some"
    with pytest.raises(ValueError, match="LoraConfig.bias"):
        config.save_pretrained(str(tmp_path))
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    model.peft_config["default"].r = -1
    with pytest.raises(ValueError, match="LoraConfig.r"):
        model.save_pretrained(str(tmp_path / "saved"))


def test_peft_type_and_task_type_are_str_enums():
    config = LoraConfig(task_type="CAUSAL_LM")
    assert config.peft_type is PeftType.LORA and config.peft_type.value == "LORA" and config.peft_type == "LORA"
    assert config.task_type is TaskType.CAUSAL_LM and config.task_type == "CAUSAL_LM"
    assert config.task_type.value == "CAUSAL_LM"
    assert VeraConfig().peft_type is PeftType.VERA and AdaLoraConfig(total_step=10).peft_type is PeftType.ADALORA
    assert json.loads(json.dumps(config.to_dict()))["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_LORA_OPTIONS))
def test_unimplemented_peft_options_are_accepted_at_their_default_and_refused_otherwise(field):
    default = UNSUPPORTED_LORA_OPTIONS[field][0]
    assert getattr(LoraConfig(**{field: default}), field) == default
    other = {bool: True, type(None): {"x": 1}, dict: {"x": 1}}[type(default)]
    with pytest.raises(ValueError, match=f"LoraConfig.{field}=.*lorakit does not implement this PEFT option"):
        LoraConfig(**{field: other})
    config = LoraConfig()
    setattr(config, field, other)
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        config.validate()


def test_every_field_of_peft_lora_config_exists():
    peft = pytest.importorskip("peft")
    ours = {f.name for f in dataclasses.fields(LoraConfig)} | {"peft_type"}
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= ours


def test_runtime_config_is_never_saved_and_ephemeral_offload_is_refused(tmp_path):
    config = LoraConfig()
    assert config.runtime_config.ephemeral_gpu_offload is False
    config.save_pretrained(str(tmp_path))
    assert "runtime_config" not in json.loads((tmp_path / "adapter_config.json").read_text())
    config.runtime_config.ephemeral_gpu_offload = True
    with pytest.raises(ValueError, match="runtime_config"):
        config.validate()


def test_unknown_keys_warn_and_are_ignored_but_known_options_with_effect_are_refused(tmp_path):
    data = LoraConfig(r=4).to_dict() | {"some_future_option": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \[.some_future_option.\]"):
        config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, LoraConfig) and config.r == 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig(r=4).to_dict() | {"lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias=True"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_replace_derives_a_validated_config():
    config = LoraConfig(r=4)
    assert dataclasses.replace(config, r=8).r == 8 and config.r == 4
    with pytest.raises(ValueError, match="LoraConfig.r"):
        dataclasses.replace(config, r=0)


def test_from_pretrained_takes_field_overrides_and_a_subfolder(tmp_path):
    LoraConfig(r=4).save_pretrained(str(tmp_path / "sub"))
    config = LoraConfig.from_pretrained(str(tmp_path), subfolder="sub", lora_alpha=32)
    assert config.r == 4 and config.lora_alpha == 32
    assert PeftConfig.from_json_file(str(tmp_path / "sub" / "adapter_config.json"))["r"] == 4


def test_adalora_accepts_the_lora_fields_peft_gives_it_at_their_defaults():
    config = AdaLoraConfig(total_step=10, use_dora=False, lora_bias=False, alpha_pattern={})
    assert config.peft_type is PeftType.ADALORA
    with pytest.raises(ValueError, match="AdaLoraConfig.use_dora=True"):
        AdaLoraConfig(total_step=10, use_dora=True)
