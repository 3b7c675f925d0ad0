"""QLoRA on the embedded SmolLM2-135M-Instruct: the base's linear weights in NF4, LoRA trained on top by the
trainer from a run config (marked slow: about a minute on 2 cores)."""

import json
from importlib import resources

import pytest
import torch
from torch import nn

from lorakit import PeftModel
from lorakit.methods.quant import NF4Linear, quantized_layers
from lorakit.models.loading import load_model_and_tokenizer
from lorakit.train.config import load_run_config
from lorakit.train.loop import run_training

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_qlora_run_on_smollm2_learns_with_4_bit_linear_weights(tmp_path):
    demo = resources.files("lorakit") / "data" / "demo"
    cfg = load_run_config(None, base={
        "model": "smollm2", "output_dir": str(tmp_path / "run"), "quantization": "nf4",
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(demo / "train.jsonl"), "val_path": str(demo / "test.jsonl"), "cutoff_len": 128,
                 "max_samples": 48},
        "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 2.0e-3, "warmup_steps": 2, "logging_steps": 1,
                  "save_steps": 3},
        "eval": {"max_samples": 4, "max_new_tokens": 16, "batch_size": 4},
    })
    result = run_training(cfg, show_progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert result.trainable_params == 2_442_240  # the same LoRA as on the dense model

    # every linear layer but lm_head is 4-bit: at most 0.3x the bytes of the same weights in bf16
    base = result.model.get_base_model()
    layers = quantized_layers(base)
    assert len(layers) == 210 and type(base.lm_head) is nn.Linear
    numel = sum(m.in_features * m.out_features for _, m in layers)
    assert numel == 106_168_320
    nbytes = sum(m.nbytes for _, m in layers)
    assert nbytes <= 0.3 * 2 * numel and nbytes < 0.15 * 4 * numel  # vs bf16, and vs the fp32 it was loaded in
    assert not any(t.numel() == 576 * 1536 and t.is_floating_point() for t in base.state_dict().values())

    # the adapter is plain LoRA: it loads onto the dense base, where it is close to the NF4-trained model
    assert {"loss", "rougeL", "exact_match"} <= set(result.metrics)
    dense, tokenizer = load_model_and_tokenizer("smollm2")
    loaded = PeftModel.from_pretrained(dense, str(tmp_path / "run" / "adapter"))
    assert loaded.adapter_state_dict().keys() == result.model.adapter_state_dict().keys()
    ids = tokenizer("Turn on the kitchen light", return_tensors="pt").input_ids
    with torch.no_grad():
        nf4_logits, dense_logits = result.model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (nf4_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean() > 0.5
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
