"""QLoRA in the trainer and the CLI: the run config's quantization fields (validation included), a tiny run on
an NF4 base (adapter and checkpoints hold LoRA only), loading from Python, and `lorakit inspect`."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from torch import nn

from lorakit.methods.quant import NF4Linear, quantized_layers
from lorakit.models import load_model_and_tokenizer
from lorakit.train.loop import run_training
from tests.integration.cli_support import run_cli
from tests.train_fixtures import one_torch_thread, save_tiny_llama, tiny_run_config  # noqa: F401


def test_run_config_quantization_fields(tmp_path):
    cfg = tiny_run_config(tmp_path, "quantization=nf4", "compute_dtype=float32", "double_quant=false")
    assert cfg.quantization_kwargs == {"quantization": "nf4", "double_quant": False, "compute_dtype": "float32"}
    assert cfg.to_dict()["quantization"] == "nf4"
    assert tiny_run_config(tmp_path).quantization_kwargs == {}


@pytest.mark.parametrize("overrides,message", [
    (("quantisation=nf4",), "unknown key 'quantisation' \\(did you mean 'quantization'\\?\\)"),
    (("quantization=nf8",), "config.quantization='nf8' is not a quantization lorakit knows \\(did you mean 'nf4'"),
    (("quantization=nf4", "compute_dtype=fp32"), "config.compute_dtype='fp32' is not allowed.*float32, bfloat16"),
    (("compute_dtype=float32",), "config.compute_dtype='float32' only applies to a quantized model"),
    (("quantization=nf4", "double_quant=maybe"), "config.double_quant must be true or false"),
    (("quantization=nf4", "finetuning_type=full", "adapter=null"),
     "quantization='nf4' cannot be used with finetuning_type 'full': quantized weights are frozen"),
    (("quantization=nf4", "finetuning_type=freeze", "adapter=null"), "cannot be used with finetuning_type 'freeze'"),
])
def test_run_config_bad_quantization(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_run_config(tmp_path, *overrides)


def test_qlora_run_trains_lora_on_nf4_and_saves_lora_only(tmp_path):
    cfg = tiny_run_config(tmp_path, "quantization=nf4", "train.max_steps=6", "train.save_steps=3")
    result = run_training(cfg, show_progress=False)
    base = result.model.get_base_model()
    layers = quantized_layers(base)
    assert len(layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for m in (
        base.get_submodule(n.removesuffix(".base_layer")) for n, _ in layers))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    checkpoint = load_file(tmp_path / "run" / "checkpoint-6" / "trainable.safetensors")
    for keys in (adapter, checkpoint):
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert result.train_loss is not None and result.steps == 6


def test_load_model_and_tokenizer_with_nf4(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model")
    model, _ = load_model_and_tokenizer(model_dir, quantization="nf4", double_quant=False, compute_dtype="float32")
    layers = quantized_layers(model)
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear
    assert layers[0][1].compute_dtype.is_floating_point and not layers[0][1].weight.double_quant
    with pytest.raises(ValueError, match="compute_dtype='float32' only applies to a quantized model"):
        load_model_and_tokenizer(model_dir, compute_dtype="float32")
    with pytest.raises(ValueError, match="quantization='int3' is not a quantization lorakit knows"):
        load_model_and_tokenizer(model_dir, quantization="int3")


def test_inspect_shows_the_quantized_layers_and_their_memory(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "model")
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--quantization", "nf4",
                             "--target-modules", "all-linear", "--r", 4)
    assert code == 0, err
    assert "q_proj: NF4Linear(32 -> 32)" in out
    assert "quantized: 14 NF4 layers: 18,432 weights in 9.6 kB (bf16: 36.9 kB, 0.261x" in out
    assert "wrapped modules: 14 (q_proj x 2" in out
