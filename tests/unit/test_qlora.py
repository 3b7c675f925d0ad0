"""QLoRA: the NF4 base layer (forward, backward, buffers, dtypes), quantizing a model, LoRA on top, merging,
and refusing layers quantized by bitsandbytes."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model, quantize_model
from lorakit.methods.lora import LoraLinear
from lorakit.methods.quant import NF4Linear, quantization_summary, quantized_layers
from tests.tiny import tiny_bert_classifier, tiny_llama, tiny_t5
from tests.toy_task import train_on_toy_task
from tests.train_fixtures import one_torch_thread  # noqa: F401  (tiny models: one thread is faster)

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_layer(out_features=48, in_features=64, bias=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return NF4Linear.from_linear(nn.Linear(in_features, out_features, bias=bias), compute_dtype=compute_dtype)


def dense_copy(layer: NF4Linear, dtype) -> nn.Linear:
    """A dense layer holding the NF4 layer's dequantized weight, in `dtype`."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight.data = layer.dequantized_weight().to(dtype)
    if layer.bias is not None:
        dense.bias.data = layer.bias.data.to(dtype)
    return dense


# ---- the layer ---------------------------------------------------------------------------------------------
def test_forward_and_backward_equal_a_dense_layer_with_the_dequantized_weight():
    layer = nf4_layer()
    dense = dense_copy(layer, torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), dense(x_dense)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_bf16_compute_equals_a_bf16_dense_matmul_and_returns_the_input_dtype():
    layer = nf4_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float32
    weight = layer.weight.dequantize(torch.bfloat16)
    expected = (x.detach().to(torch.bfloat16) @ weight.T).float() + layer.bias
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.sum().backward()
    expected_grad = (torch.ones(4, 48, dtype=torch.bfloat16) @ weight).float()
    torch.testing.assert_close(x.grad, expected_grad, atol=0, rtol=0)


def test_backward_keeps_no_dense_weight_and_no_input():
    """Nothing is saved for the backward: W is dequantized again there, and x is not needed (W is frozen)."""
    layer = nf4_layer(out_features=256, in_features=256, bias=False)
    x = torch.randn(8, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert saved == []
    out.sum().backward()
    assert x.grad is not None


def test_weight_info_buffers_and_state_dict_through_safetensors(tmp_path):
    layer = nf4_layer(bias=True)
    assert layer.weight.shape == (48, 64) and layer.weight.dtype == torch.float32
    assert layer.in_features == 64 and layer.out_features == 48
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"weight_packed", "weight_absmax_codes", "weight_absmax_scales", "weight_absmax_offset"}
    assert layer.nbytes == sum(b.numel() * b.element_size() for b in buffers.values())
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")  # plain tensors: no pickle
    other = nf4_layer(seed=1)
    other.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 64)
    torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)


def test_casting_the_model_keeps_the_scales_fp32_and_the_dense_dtype_follows():
    layer = nf4_layer(compute_dtype=torch.float32)
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax_scales.dtype == torch.float32 and layer.weight_absmax_offset.dtype == torch.float32
    assert layer.weight_packed.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer.dequantized_weight().dtype == torch.bfloat16
    torch.testing.assert_close(layer.dequantized_weight().float(), before.to(torch.bfloat16).float(), atol=0, rtol=0)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_store_dense_weight_warns_and_returns_a_dense_linear_sharing_the_bias():
    layer = nf4_layer()
    weight = torch.randn(48, 64)
    with pytest.warns(UserWarning, match="merging into an NF4 layer"):
        dense = layer.store_dense_weight(weight)
    assert type(dense) is nn.Linear and torch.equal(dense.weight, weight) and dense.bias is layer.bias


# ---- a model ---------------------------------------------------------------------------------------------
def test_quantize_model_replaces_every_linear_but_the_output_head():
    model = quantize_model(tiny_llama(), compute_dtype="float32")
    names = {n.rsplit(".", 1)[-1] for n, _ in quantized_layers(model)}
    assert names == set(LINEAR_NAMES) and len(quantized_layers(model)) == 14
    assert type(model.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    assert quantize_model(model) is model and len(quantized_layers(model)) == 14  # twice: harmless
    assert quantization_summary(model) == ("14 NF4 layers: 18,432 weights in 9.6 kB (bf16: 36.9 kB, 0.261x; "
                                           "4.17 bits/weight)")


def test_quantize_model_keeps_classifier_heads_and_fp32_modules_dense():
    bert = quantize_model(tiny_bert_classifier())
    assert type(bert.classifier) is nn.Linear and isinstance(bert.bert.encoder.layer[0].attention.self.query, NF4Linear)
    t5 = quantize_model(tiny_t5())  # T5 keeps its feed-forward output `wo` in fp32 (_keep_in_fp32_modules)
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    assert isinstance(t5.encoder.block[0].layer[1].DenseReluDense.wi, NF4Linear)
    llama = quantize_model(tiny_llama(), skip_modules=["down_proj"])
    assert type(llama.model.layers[0].mlp.down_proj) is nn.Linear


def test_quantized_linear_weights_take_at_most_0_3x_their_bf16_bytes():
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    dense = {n: m.weight.numel() * 2 for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    quantize_model(model)
    quantized = {n: m.nbytes for n, m in quantized_layers(model)}
    assert quantized.keys() == dense.keys()
    for name in dense:
        assert quantized[name] <= 0.3 * dense[name], name
    assert sum(quantized.values()) / sum(dense.values()) == pytest.approx(4.127 / 16, abs=0.01)
    # and the model holds no dense copy: only the packed codes, the scales and the rest of the model
    floats = sum(t.numel() for n, t in model.state_dict().items() if t.is_floating_point() and "weight_absmax" not in n)
    assert floats == sum(p.numel() for p in model.parameters())


def test_lora_wraps_nf4_layers_and_only_lora_gets_gradients():
    model = quantize_model(tiny_llama(), compute_dtype="float32")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    layers = [m for m in peft.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    assert (layers[0].in_features, layers[0].out_features) == (32, 32)
    ids = torch.randint(0, 200, (2, 7))
    peft(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in peft.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in peft.named_parameters() if p.requires_grad}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)


def test_parameter_counts_include_the_quantized_weights():
    """As PEFT counts bitsandbytes' 4-bit weights: the same totals as on the dense model."""
    config = LoraConfig(r=4, target_modules="all-linear")
    dense = get_peft_model(tiny_llama(), config).get_nb_trainable_parameters()
    quantized = get_peft_model(quantize_model(tiny_llama()), config).get_nb_trainable_parameters()
    assert quantized == dense and dense[0] > 0


def test_identity_lora_on_nf4_equals_the_quantized_model():
    model = quantize_model(tiny_llama(), compute_dtype="float32")
    ids = torch.randint(0, 200, (2, 7))
    expected = model(ids).logits
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(peft(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


def test_lora_learns_on_an_nf4_base():
    """The toy mapping of test_lora_learns.py, through LoRA alone on a quantized base (bf16 compute)."""
    torch.manual_seed(0)
    model = quantize_model(tiny_llama())
    targets = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]  # lm_head stays dense, LoRA on it too
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    frozen = {n: b.clone() for n, b in model.named_buffers() if "weight_" in n}
    losses = train_on_toy_task(model, 60)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.1 * first, (first, last)
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)


def test_merge_and_unload_warns_and_returns_a_dense_model_with_the_same_outputs():
    model = quantize_model(tiny_llama(), compute_dtype="float32")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 200, (2, 7))
    expected = peft(input_ids=ids).logits
    with pytest.warns(UserWarning, match="merging into an NF4 layer"):
        merged = peft.merge_and_unload()
    assert not quantized_layers(merged)
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32
               for n, m in merged.named_modules() if n.endswith(LINEAR_NAMES))
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_the_dequantized_weights():
    model = quantize_model(tiny_llama(), compute_dtype="float32")
    dequantized = {n: m.dequantized_weight() for n, m in quantized_layers(model)}
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.merge_adapter()
    peft.unmerge_adapter()
    base = peft.get_base_model()
    for name, weight in dequantized.items():
        torch.testing.assert_close(base.get_submodule(name).base_layer.weight, weight, atol=1e-6, rtol=0)


def test_adapter_trained_on_nf4_loads_on_the_dense_base(tmp_path):
    """The adapter file holds only LoRA tensors, with the same keys as on a dense base (PEFT's format)."""
    peft = get_peft_model(quantize_model(tiny_llama()), LoraConfig(r=4, target_modules="all-linear",
                                                                   init_lora_weights=False))
    peft.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    dense = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert set(dense.adapter_state_dict()) == keys


# ---- bad input -------------------------------------------------------------------------------------------
def bitsandbytes_class(name: str) -> type[nn.Linear]:
    """A class named and placed like bitsandbytes' (an nn.Linear subclass), without bitsandbytes."""
    return type(name, (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})


@pytest.mark.parametrize("class_name", ["Linear4bit", "Linear8bitLt"])
def test_layers_quantized_by_bitsandbytes_are_refused_never_wrapped_as_linear(class_name):
    fake = bitsandbytes_class(class_name)
    for targets in ("all-linear", ["q_proj"]):
        model = tiny_llama()
        model.model.layers[0].self_attn.q_proj = fake(32, 32, bias=False)
        with pytest.raises(TypeError, match=f"'model.layers.0.self_attn.q_proj' is a {class_name} quantized by "
                                            "bitsandbytes, which lorakit does not wrap"):
            get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    with pytest.raises(TypeError, match=f"cannot quantize 'model.layers.0.self_attn.q_proj': it is a {class_name}"):
        quantize_model(model)


@pytest.mark.parametrize("kwargs,message", [
    ({"quantization": "nf5"}, "quantization='nf5' is not a quantization lorakit knows \\(did you mean 'nf4'\\?\\)"),
    ({"quantization": None}, "quantization=None is not a quantization"),
    ({"compute_dtype": "bf16"}, "compute_dtype='bf16' is not allowed.*float32, bfloat16, float16"),
    ({"compute_dtype": torch.int8}, "compute_dtype=torch.int8 is not allowed"),
    ({"blocksize": 65}, "blocksize must be an even integer"),
    ({"double_quant": 1}, "double_quant must be True or False"),
    ({"skip_modules": "lm_head"}, "skip_modules must be a list"),
])
def test_quantize_model_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_llama(), **kwargs)


def test_quantize_model_refuses_a_model_with_adapters_or_without_linear_layers():
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds adapters; quantize the base model first"):
        quantize_model(peft)
    with pytest.raises(ValueError, match="found no nn.Linear layer to quantize in Sequential"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)))
