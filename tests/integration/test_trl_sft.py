"""TRL's SFTTrainer on lorakit models (lorakit.integrations.SFTTrainer; docs/integrations.md), end to end on the
tiny Llama with SFTConfig's defaults (gradient checkpointing, TRL's fused LM head): eval_loss, PEFT-format adapter
files in every checkpoint and at the end, load_best_model_at_end, resume_from_checkpoint, a lorakit peft_config."""

from __future__ import annotations

import pytest
import trl
from trl import SFTConfig

import lorakit
from lorakit.integrations import SFTTrainer
from tests.integration.trainer_support import (
    adapter_weights,
    assert_loads_in_peft,
    assert_same_weights,
    chat_dataset,
    eval_losses,
    lora_model,
    quick_args,
)
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.train_fixtures import one_torch_thread  # noqa: F401  (autouse)


def build(model, output_dir, trainer_cls=SFTTrainer, **overrides):
    data = chat_dataset()
    peft_config = overrides.pop("peft_config", None)
    return trainer_cls(model=model, args=SFTConfig(**quick_args(output_dir, max_length=64, **overrides)),
                       train_dataset=data, eval_dataset=data.select(range(8)), processing_class=tiny_tokenizer(),
                       peft_config=peft_config)


def test_sft_trains_evaluates_and_checkpoints_peft_adapters(tmp_path):
    model = lora_model()
    trainer = build(model, tmp_path, load_best_model_at_end=True)
    assert trainer.args.gradient_checkpointing  # TRL's default, kept
    trainer.train()
    losses = eval_losses(trainer)
    assert sorted(losses) == [3, 6] and losses[6] < losses[3]
    trainer.save_model()
    for name in ("checkpoint-3", "checkpoint-6", "."):
        assert_loads_in_peft(tmp_path / name)
    best = trainer.state.best_model_checkpoint  # checkpoint-6: the lower loss
    assert best.endswith("checkpoint-6")
    # (the trained model's weights, not its outputs: accelerate leaves SFTConfig's bf16 autocast on its forward)
    assert_same_weights({k.replace(".default", ""): v for k, v in model.adapter_state_dict().items()},
                        adapter_weights(best))
    card = (tmp_path / "checkpoint-6" / "README.md").read_text()
    assert "trl SFTTrainer" in card and "32 examples" in card


def test_sft_resume_from_checkpoint_continues_the_run_exactly(tmp_path):
    build(lora_model(), tmp_path / "a").train()
    resumed = build(lora_model(seed=1), tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert_same_weights(adapter_weights(tmp_path / "b" / "checkpoint-6"), adapter_weights(tmp_path / "a" / "checkpoint-6"))


def test_a_lorakit_peft_config_wraps_the_model(tmp_path):
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = build(tiny_llama(), tmp_path, max_steps=3, eval_strategy="no", peft_config=config)
    assert isinstance(trainer.model, lorakit.PeftModel)
    trainer.train()
    assert_loads_in_peft(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="pass the model itself"):
        build("some/model", tmp_path / "b", peft_config=config)


def test_trl_alone_takes_only_peft_configs(tmp_path):
    """What docs/integrations.md says: TRL's own SFTTrainer refuses a lorakit config (it builds a PEFT model from
    PEFT's configs); wrap the model with lorakit first, or use lorakit.integrations.SFTTrainer."""
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(TypeError, match="peft.PeftConfig"):
        build(tiny_llama(), tmp_path, trainer_cls=trl.SFTTrainer, peft_config=config)
