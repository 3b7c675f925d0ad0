"""train/setup.py: prepare_training_model, the one sequence from a loaded model to one ready for its optimizer (the
trainer and `lorakit bench trainer` both call it), and its precision step apply_training_precision."""

import copy

import torch

from lorakit.ops.fused_modules import use_fused_modules
from lorakit.train.hooks import RunContext
from lorakit.train.setup import apply_training_precision, prepare_model, prepare_training_model
from tests.tiny import tiny_llama
from tests.train_fixtures import tiny_run_config

CPU = torch.device("cpu")


def dtypes(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


def test_a_bf16_adapter_run_keeps_trained_and_hook_rewritten_weights_fp32_and_stores_the_rest_in_bf16(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.bf16=true", "train.max_steps=9", "train.relora_steps=3")
    prepared = prepare_training_model(tiny_llama(), cfg, CPU, RunContext())
    model, types = prepared.model, dtypes(prepared.model)
    assert prepared.bf16 and [hook.name for hook in prepared.hooks]
    rewritten = {name for hook in prepared.hooks for name in hook.changed_base_parameters()}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert rewritten and set(prepared.state_names) == trained | rewritten
    assert all(types[name] == torch.float32 for name in prepared.state_names)  # ReLoRA merges into fp32 weights
    # everything else went to bf16, and stored_in_bf16 names exactly those, with their dtype before
    assert prepared.stored_in_bf16 == {name: torch.float32 for name, dtype in types.items() if dtype == torch.bfloat16}
    assert set(prepared.stored_in_bf16) == set(types) - set(prepared.state_names)
    assert use_fused_modules(model) == []  # train.fused_modules (the default): already in


def test_the_hooks_get_the_run_context_with_the_prepared_models_config(tmp_path, monkeypatch):
    from lorakit.train import setup

    seen = []
    monkeypatch.setattr(setup, "run_hooks", lambda model, cfg, run: seen.append((model, run)) or [])
    run = RunContext(rows=[{"input_ids": [1]}], rank=0, world_size=1, resumed_state={"hook": {}})
    prepared = prepare_training_model(tiny_llama(), tiny_run_config(tmp_path), CPU, run)
    ((model, given),) = seen
    assert model is prepared.model and given.model_config is prepared.model.config
    assert given.rows is run.rows and given.resumed_state == {"hook": {}}


def test_pissa_residual_is_computed_in_fp32_before_the_frozen_weights_go_to_bf16(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.bf16=true", "adapter.init_lora_weights=pissa")
    fp32 = prepare_model(tiny_llama(), copy.deepcopy(cfg))
    prepared = prepare_training_model(tiny_llama(), cfg, CPU, RunContext())
    name = next(n for n in prepared.stored_in_bf16 if n.endswith("q_proj.base_layer.weight"))
    residual = dict(fp32.named_parameters())[name].detach()
    stored = dict(prepared.model.named_parameters())[name].detach()
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, residual.to(torch.bfloat16))


def test_full_runs_keep_every_weight_fp32_and_fused_modules_can_be_switched_off(tmp_path):
    cfg = tiny_run_config(tmp_path, "finetuning_type=full", "train.bf16=true", "train.fused_modules=false")
    prepared = prepare_training_model(tiny_llama(), cfg, CPU, RunContext())
    assert prepared.bf16 and prepared.stored_in_bf16 == {}  # LISA may unfreeze any block: nothing stored in bf16
    assert set(dtypes(prepared.model).values()) == {torch.float32}
    assert use_fused_modules(prepared.model)  # not swapped in by the setup


def test_apply_training_precision_on_a_model_built_outside_the_trainer(tmp_path):
    import lorakit

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    args = tiny_run_config(tmp_path, "train.bf16=false").train
    assert apply_training_precision(model, args, CPU) == (False, {})
    assert set(dtypes(model).values()) == {torch.float32} and use_fused_modules(model) == []
