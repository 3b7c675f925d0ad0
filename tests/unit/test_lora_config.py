"""LoraConfig validation and JSON (PEFT field names both ways)."""

import json

import pytest

from lorakit import LoraConfig, PeftConfig, TaskType


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_alpha=-1), "lora_alpha"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"), (dict(bias="some"), "bias"),
    (dict(init_lora_weights="orthogonal"), "init_lora_weights"), (dict(task_type="CAUSAL"), "task_type"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules=[1, 2]), "target_modules"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(layers_to_transform=["0"]), "layers_to_transform"),
    (dict(use_dora="yes"), "use_dora"), (dict(init_lora_weights="pissa_niter_x"), "init_lora_weights"),
    (dict(init_lora_weights="loftq"), "init_lora_weights"), (dict(init_lora_weights=3), "init_lora_weights"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        LoraConfig(**kwargs)


def test_config_can_be_changed_after_construction_and_is_validated_again_when_used():
    config = LoraConfig(r=4)
    config.r = 8
    assert config.r == 8
    config.r = 0
    with pytest.raises(ValueError, match="LoraConfig.r must be a positive integer"):
        config.validate()


def test_scaling_plain_and_rslora_and_patterns():
    config = LoraConfig(r=16, lora_alpha=32, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*": 2})
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.scaling_for("model.layers.0.self_attn.v_proj") == 8.0
    assert config.scaling_for("model.layers.1.self_attn.q_proj") == 2 / 16
    rs = LoraConfig(r=16, lora_alpha=32, use_rslora=True)
    assert rs.scaling_for("x") == 32 / 4


def test_json_round_trip_and_task_type_enum(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM,
                        rank_pattern={"q_proj": 2})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert PeftConfig.from_pretrained(str(tmp_path)) == config
    assert LoraConfig.from_pretrained(str(tmp_path)) == config


def test_peft_only_keys_neutral_values_are_ignored():
    config = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "peft_version": "0.21.2", "lora_bias": False,
                                   "megatron_config": None, "loftq_config": {}, "eva_config": None})
    assert config.r == 4


def test_unsupported_peft_option_is_an_error_not_silently_dropped():
    with pytest.raises(ValueError, match="lora_bias=True"):
        LoraConfig.from_dict({"peft_type": "LORA", "lora_bias": True})


def test_unknown_keys_from_a_newer_peft_warn_and_are_ignored():
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['lora_alfa'\] for class LoraConfig, these are "
                      r"ignored.*did you mean 'lora_alpha'"):
        config = LoraConfig.from_dict({"peft_type": "LORA", "lora_alfa": 16, "r": 2})
    assert config.r == 2 and config.lora_alpha == 8


def test_unknown_method_in_config_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "SUPER_LORA", "r": 2}))
    with pytest.raises(ValueError, match=r"Unknown adapter method 'SUPER_LORA'.*supports: (.*, )?lora\b"):
        PeftConfig.from_pretrained(str(tmp_path))
