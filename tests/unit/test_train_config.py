"""The run config: YAML onto dataclasses, key=value overrides, and errors that name the key and the fix."""

import pytest
import yaml

from lorakit.train.config import RunConfig, load_run_config

MINIMAL = {"output_dir": "runs/x", "data": {"path": "train.jsonl"},
           "adapter": {"method": "lora", "r": 8, "target_modules": "all-linear"}}


def write_yaml(tmp_path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_a_short_yaml_with_overrides(tmp_path):
    path = write_yaml(tmp_path, {**MINIMAL, "train": {"learning_rate": "2e-4", "num_epochs": 3}})
    cfg = load_run_config(path, ["train.learning_rate=1e-4", "train.bf16=true", "adapter.target_modules=[q_proj]",
                                 "data.val_size=0.1", "eval.max_new_tokens=16"])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)  # "1e-4" is a YAML string
    assert cfg.train.num_epochs == 3 and cfg.train.bf16 is True
    assert set(cfg.adapter.target_modules) == {"q_proj"} and cfg.adapter.r == 8
    assert cfg.data.val_size == 0.1 and cfg.eval.max_new_tokens == 16


def test_the_data_shorthand_takes_overrides(tmp_path):
    path = write_yaml(tmp_path, {**MINIMAL, "data": "train.jsonl"})
    cfg = load_run_config(path, ["data.val_size=2"])
    assert cfg.data.path == "train.jsonl" and cfg.data.val_size == 2


def test_overrides_never_change_the_callers_base_dict():
    base = {**MINIMAL, "train": {"learning_rate": 1e-3}, "adapter": dict(MINIMAL["adapter"])}
    snapshot = yaml.safe_dump(base)
    first = load_run_config(None, ["train.learning_rate=5e-4", "adapter.r=16"], base=base)
    second = load_run_config(None, [], base=base)
    assert yaml.safe_dump(base) == snapshot
    assert (first.train.learning_rate, first.adapter.r) == (5e-4, 16)
    assert (second.train.learning_rate, second.adapter.r) == (1e-3, 8)


def test_the_saved_dict_reproduces_the_config():
    cfg = load_run_config(None, ["train.loraplus_lr_ratio=4", "adapter.lora_dropout=0.1", "finetuning_type=lora",
                                 "train.max_steps=7"], base=MINIMAL)
    reloaded = load_run_config(None, base=yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert reloaded == cfg


@pytest.mark.parametrize("override, message", [
    ("train.learning_rat=1e-4", r"config: train: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    ("ouput_dir=x", r"config: unknown key 'ouput_dir' \(did you mean 'output_dir'\?\); valid keys: "),
    ("adapter.lora_alph=16", r"adapter \(lora\): unknown key 'lora_alph' \(did you mean 'lora_alpha'\?\)"),
    ("data.cutof_len=8", r"data: unknown key 'cutof_len' \(did you mean 'cutoff_len'\?\)"),
    ("eval.max_new_token=8", r"did you mean 'max_new_tokens'"),
])
def test_an_unknown_key_suggests_the_closest_one(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [override], base=MINIMAL)


def test_an_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path, {**MINIMAL, "train": {"batch_sise": 4}})
    with pytest.raises(ValueError, match=rf"{tmp_path}/run.yaml: train: unknown key 'batch_sise' "
                                         r"\(did you mean 'batch_size'\?\)"):
        load_run_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-0.1", r"train.learning_rate must be a positive number, got -0.1"),
    ("train.learning_rate=fast", r"train.learning_rate must be a positive number, got 'fast'"),
    ("train.batch_size=0", r"train.batch_size must be a positive integer, got 0"),
    ("train.batch_size=2.5", r"train.batch_size must be a positive integer, got 2.5"),
    ("train.lr_scheduler=exponential", r"train.lr_scheduler must be one of 'cosine', 'linear', 'constant'; "
                                       r"got 'exponential'"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio must be in \[0.0, 1.0\), got 1.5"),
    ("train.max_steps=0", r"train.max_steps must be a positive integer, got 0"),
    ("train.save_steps=-1", r"train.save_steps must be an integer >= 0, got -1"),
    ("train.weight_decay=-1", r"train.weight_decay must be >= 0, got -1"),
    ("train.loraplus_lr_ratio=0", r"train.loraplus_lr_ratio must be a positive number, got 0"),
    ("finetuning_type=qlora", r"config.finetuning_type must be one of 'adapter', 'lora', 'full', 'freeze'; got 'qlora'"),
    ("task_type=TOKEN_CLS", r"config.task_type must be one of 'CAUSAL_LM', 'SEQ_CLS'; got 'TOKEN_CLS'"),
    ("data.cutoff_len=0", r"DataConfig.cutoff_len must be a positive integer, got 0"),
    ("eval.max_samples=-1", r"eval.max_samples must be an integer >= 0, got -1"),
    ("adapter.r=0", r"config: adapter: LoraConfig.r must be a positive integer, got 0"),
    ("adapter.method=nope", r"Unknown adapter method 'nope'. lorakit supports: (.*, )?lora\b"),
])
def test_an_invalid_value_names_the_field_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [override], base=MINIMAL)


@pytest.mark.parametrize("drop, message", [
    ("output_dir", r"output_dir is required"),
    ("data", r"data.path is required"),
    ("adapter", r"config.adapter is required when finetuning_type is adapter"),
])
def test_a_missing_required_setting_says_what_it_is_for(drop, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [], base={k: v for k, v in MINIMAL.items() if k != drop})


def test_full_and_freeze_need_no_adapter():
    base = {k: v for k, v in MINIMAL.items() if k != "adapter"}
    assert load_run_config(None, ["finetuning_type=full"], base=base).adapter is None
    assert isinstance(load_run_config(None, ["finetuning_type=freeze"], base=base), RunConfig)


@pytest.mark.parametrize("item, message", [
    ("train.learning_rate", r"override 'train.learning_rate' must look like key=value"),
    ("output_dir.x=1", r"'output_dir' is not a section"),
])
def test_a_malformed_override_says_how_to_write_one(item, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [item], base=MINIMAL)


def test_a_missing_or_broken_yaml_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml' not found"):
        load_run_config(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {learning_rate: [1e-4\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_run_config(str(broken))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a mapping of settings"):
        load_run_config(str(listed))
