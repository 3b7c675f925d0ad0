"""Strategy options are validated with the run config: each bad value is a ValueError naming the field, the value
and what is allowed; a strategy on the wrong kind of run, or an option of a strategy that is off, is refused."""

import pytest

from tests.train_fixtures import tiny_run_config

FULL = ("finetuning_type=full", "adapter=null")

BAD = {
    "relora period 0": (("train.relora_steps=0",), r"train.relora_steps must be an integer >= 1, got 0"),
    "relora warm-up as long as the period": (("train.relora_steps=4", "train.relora_warmup_steps=4"),
                                             r"train.relora_warmup_steps=4 must be shorter than train.relora_steps=4"),
    "relora negative warm-up": (("train.relora_steps=4", "train.relora_warmup_steps=-1"),
                                r"train.relora_warmup_steps must be an integer >= 0, got -1"),
    "relora prune ratio above 1": (("train.relora_steps=4", "train.relora_prune_ratio=1.5"),
                                   r"train.relora_prune_ratio must be in \[0.0, 1.0\], got 1.5"),
    "relora on full fine-tuning": ((*FULL, "train.relora_steps=4"),
                                   r"train.relora_steps=4: ReLoRA trains an adapter, but finetuning_type is 'full'; "
                                   r"use finetuning_type adapter"),
    "relora under fsdp": (("train.relora_steps=4", "train.distributed=fsdp"),
                          r"ReLoRA changes the base weights, which train.distributed=fsdp shards"),
    "relora option while relora is off": (("train.relora_warmup_steps=3",),
                                          r"train.relora_warmup_steps=3 has no effect: ReLoRA is off; switch it on "
                                          r"with train.relora_steps"),
    "lisa gamma 0": ((*FULL, "train.lisa_activated_layers=0"),
                     r"train.lisa_activated_layers must be an integer >= 1, got 0"),
    "lisa negative gamma": ((*FULL, "train.lisa_activated_layers=-2"),
                            r"train.lisa_activated_layers must be an integer >= 1, got -2"),
    "lisa interval 0": ((*FULL, "train.lisa_activated_layers=1", "train.lisa_interval_steps=0"),
                        r"train.lisa_interval_steps must be an integer >= 1, got 0"),
    "lisa on an adapter run": (("train.lisa_activated_layers=1",),
                               r"train.lisa_activated_layers=1: LISA trains the model's own weights, but "
                               r"finetuning_type is 'adapter'; use finetuning_type full"),
    "lisa on freeze": (("finetuning_type=freeze", "adapter=null", "train.lisa_activated_layers=1"),
                       r"finetuning_type is 'freeze'; use finetuning_type full"),
    "lisa interval while lisa is off": ((*FULL, "train.lisa_interval_steps=5"),
                                        r"train.lisa_interval_steps=5 has no effect: LISA is off"),
    "delta-lora negative lambda": (("train.delta_lora_lambda=-0.5",),
                                   r"train.delta_lora_lambda must be in \[0.0, inf\), got -0.5"),
    "delta-lora negative start": (("train.delta_lora_lambda=0.5", "train.delta_lora_start_step=-1"),
                                  r"train.delta_lora_start_step must be an integer >= 0, got -1"),
    "delta-lora on full fine-tuning": ((*FULL, "train.delta_lora_lambda=0.5"),
                                       r"Delta-LoRA trains an adapter, but finetuning_type is 'full'"),
    "lora-drop threshold 0": (("train.lora_drop_threshold=0",), r"train.lora_drop_threshold must be in \(0.0, 1.0\]"),
    "lora-drop threshold above 1": (("train.lora_drop_threshold=1.2",),
                                    r"train.lora_drop_threshold must be in \(0.0, 1.0\], got 1.2"),
    "lora-drop no warm-up": (("train.lora_drop_threshold=0.9", "train.lora_drop_warmup_steps=0"),
                             r"train.lora_drop_warmup_steps must be an integer >= 1, got 0"),
    "lora-drop empty sample": (("train.lora_drop_threshold=0.9", "train.lora_drop_sample_ratio=0"),
                               r"train.lora_drop_sample_ratio must be in \(0.0, 1.0\], got 0"),
    "lora-drop on full fine-tuning": ((*FULL, "train.lora_drop_threshold=0.9"),
                                      r"LoRA-drop trains an adapter, but finetuning_type is 'full'"),
}


@pytest.mark.parametrize("overrides, message", BAD.values(), ids=BAD.keys())
def test_bad_strategy_settings_fail_clearly(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_run_config(tmp_path, *overrides)


def test_strategies_are_off_by_default_and_combine(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.relora_steps=4", "train.delta_lora_lambda=0.5",
                          "train.lora_drop_threshold=0.9")
    assert cfg.train.relora_steps == 4 and cfg.train.lisa_activated_layers is None
    assert "relora_steps" in cfg.to_dict()["train"]


def test_adapter_strategies_combine_in_one_run(tmp_path):
    """LoRA-drop's shared adapter, restarted by ReLoRA, with Delta-LoRA moving W: one run, a merged model."""
    from lorakit.train.loop import run_training
    from tests.strategies.support import four_block_llama

    result = run_training(tiny_run_config(tmp_path, "train.max_steps=6", "train.relora_steps=3",
                                          "train.delta_lora_lambda=0.5", "train.lora_drop_threshold=0.5",
                                          "train.lora_drop_warmup_steps=2", model=four_block_llama(tmp_path)),
                          show_progress=False)
    assert result.steps == 6 and (tmp_path / "run" / "model" / "config.json").is_file()
