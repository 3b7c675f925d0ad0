"""Which modules a config targets, and the errors when it targets nothing or the wrong thing."""

import pytest
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.adapter_layer import AdapterLayer
from lorakit.modules_to_save import ModulesToSaveWrapper
from tests.tiny import tiny_bert_classifier, tiny_gpt2, tiny_llama


def wrapped(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, AdapterLayer))


def test_list_names_match_exact_or_dotted_suffix():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "layers.1.mlp.down_proj"]))
    assert wrapped(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                              "model.layers.1.self_attn.q_proj"]


def test_regex_is_a_full_match():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*layers\.0\.self_attn\.(k|v)_proj"))
    assert wrapped(model) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=r"q_pro"))


def test_all_linear_skips_the_output_head():
    names = wrapped(get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear")))
    assert len(names) == 2 * 7 and "lm_head" not in names
    gpt2 = wrapped(get_peft_model(tiny_gpt2(), LoraConfig(target_modules="all-linear")))
    assert "transformer.h.0.attn.c_attn" in gpt2 and "lm_head" not in gpt2


def test_all_linear_on_a_classifier_skips_its_head():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert "classifier" not in wrapped(model)
    assert isinstance(model.get_base_model().classifier, ModulesToSaveWrapper)


def test_default_targets_by_architecture():
    assert wrapped(get_peft_model(tiny_llama(), LoraConfig()))[-2:] == ["model.layers.1.self_attn.q_proj",
                                                                       "model.layers.1.self_attn.v_proj"]


def test_exclude_and_layers_to_transform():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"],
                                                   layers_to_transform=[1], layers_pattern="layers"))
    assert wrapped(model) == ["model.layers.1.self_attn.q_proj"]


def test_no_match_lists_candidate_modules():
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["query"]))
    message = str(err.value)
    assert "['query']" in message and "q_proj" in message and "gate_proj" in message


def test_unsupported_layer_type_names_module_and_type():
    with pytest.raises(TypeError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))
    ln = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="is a LayerNorm.*supported: Conv1D, Conv1d, Conv2d, Conv3d, Embedding, Linear, "
                                        "MultiheadAttention"):
        get_peft_model(ln, LoraConfig(target_modules=["1"]))
    with pytest.raises(ValueError, match="is a LayerNorm"):  # what PEFT raises: code written for it catches ours
        get_peft_model(ln, LoraConfig(target_modules=["1"]))


def test_failed_injection_leaves_the_model_untouched():
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert [type(m) for m in model.modules()] == before


def test_rank_pattern_gives_per_module_rank():
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                   rank_pattern={"v_proj": 2}))
    layer = model.get_base_model().model.layers[0].self_attn
    assert layer.q_proj.lora_A["default"].weight.shape == (8, 32)
    assert layer.v_proj.lora_A["default"].weight.shape == (2, 32)


def test_modules_to_save_typo_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save entry 'clasifier'"):
        get_peft_model(tiny_bert_classifier(), LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))

