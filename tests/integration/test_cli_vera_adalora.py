"""VeRA and AdaLoRA through the trainer and the CLI: selected from the run config, trained by `lorakit train` on
a tiny model, shown by `lorakit inspect`; AdaLoRA's total_step taken from the run, its budget applied by the
trainer's hook (checkpointed), its final rank pattern saved with the adapter, which PEFT loads."""

from __future__ import annotations

import contextlib
import io
import json

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.main import main
from lorakit.train.loop import run_training
from tests.integration.cli_support import ALPACA_ROWS, make_model_dir, run_cli, write_jsonl
from tests.train_fixtures import one_torch_thread, tiny_run_config  # noqa: F401

ADALORA = "adapter={method: adalora, init_r: 6, target_r: 2, tinit: 1, tfinal: 2, target_modules: all-linear}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_vera_adalora")
    return root, make_model_dir(root / "model"), write_jsonl(root / "train.jsonl", ALPACA_ROWS * 2)


def cli_train(workspace, name: str, adapter: str, *extra: str):
    root, model, data = workspace
    config = root / f"{name}.yaml"
    config.write_text(f"model: {model}\nadapter: {adapter}\ndata: {{path: {data}}}\n"
                      f"train: {{learning_rate: 1.0e-2, max_steps: 6, batch_size: 4, logging_steps: 1}}\n"
                      f"eval: {{generate: false}}\noutput_dir: {root / name}\n", encoding="utf-8")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", str(config), "--no-progress", *extra])
    return code, root / name


def test_lorakit_train_with_vera(workspace):
    code, out = cli_train(workspace, "vera", "{method: vera, r: 64}")
    assert code == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["r"] == 64 and saved["save_projection"] is True
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (64, 32) and tensors["base_model.vera_B"].shape == (32, 64)
    before = tensors["base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b"]
    assert before.abs().sum() > 0  # trained away from its zero init
    results = json.loads((out / "train_results.json").read_text())
    # q_proj (d_out 32) and v_proj (d_out 16), default targets, 2 layers: (64 + 32) + (64 + 16) per layer
    assert results["trainable_params"] == 2 * (64 + 32 + 64 + 16)


def test_lorakit_train_with_adalora_fills_total_step_and_saves_the_rank_pattern(workspace):
    _, model_dir, _ = workspace
    code, out = cli_train(workspace, "adalora", "{method: adalora, init_r: 6, target_r: 2, tinit: 1, tfinal: 2, "
                                                "target_modules: all-linear}")
    assert code == 0
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["adapter"]["total_step"] == 6  # taken from the run: max_steps
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 6
    pattern = saved["rank_pattern"]
    assert len(pattern) == 14 and sum(sum(kept) for kept in pattern.values()) == 2 * 14  # target_r on average
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, kept in pattern.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(kept), 1)
    # the trained adapter loads in PEFT and in lorakit with the same logits
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter"))
    ours = lorakit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter"))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_adalora_checkpoints_hold_the_allocation_state(tmp_path):
    cfg = tiny_run_config(tmp_path, ADALORA, "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=null")
    run_training(cfg, show_progress=False)
    hooks = json.loads((tmp_path / "run" / "checkpoint-2" / "hooks.json").read_text())
    assert sum(sum(kept) for kept in hooks["adalora_default/rank_pattern"].values()) == hooks["adalora_default/budget"]
    emas = load_file(tmp_path / "run" / "checkpoint-2" / "hooks.safetensors")
    assert "adalora_default/exp_avg_ipt.model.layers.0.self_attn.q_proj.lora_A" in emas
    assert "adalora_default/exp_avg_unc.model.layers.1.mlp.down_proj.lora_B" in emas
    final_hooks = json.loads((tmp_path / "run" / "checkpoint-6" / "hooks.json").read_text())
    assert final_hooks["adalora_default/budget"] == 2 * 14  # the final allocation was at step 6 - tfinal = 4
    assert not (tmp_path / "run" / "checkpoint-6" / "hooks.safetensors").exists()  # EMAs dropped after it


def test_adalora_run_settings_that_do_not_fit_are_refused(tmp_path):
    too_long = tiny_run_config(tmp_path, ADALORA.replace("target_modules", "total_step: 50, target_modules"),
                               "train.max_steps=6")
    with pytest.raises(ValueError, match=r"AdaLoraConfig.total_step=50 is longer than this run \(6 optimizer steps\)"):
        run_training(too_long, show_progress=False)
    no_budget = tiny_run_config(tmp_path, ADALORA.replace("tfinal: 2", "tfinal: 5"), "train.max_steps=6")
    with pytest.raises(ValueError, match=r"tinit=1 and tfinal=5 leave no budget phase in total_step=6 steps.*filled "
                                         r"from the run: 6 optimizer steps"):
        run_training(no_budget, show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_inspect_shows_vera_and_adalora_trainable_counts(workspace, capsys):
    _, model_dir, _ = workspace
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--no-tree", "--method", "vera", "--r", 16,
                             "--target-modules", "q_proj", "v_proj")
    assert code == 0, err
    assert "target candidates for vera" in out and "adapter: vera r=16" in out
    # per layer q_proj: 16 + 32, v_proj: 16 + 16; the projections are buffers
    assert "trainable params: 160 ||" in out
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--no-tree", "--method", "adalora",
                             "--option", "init_r=4", "--option", "target_r=2", "--option", "total_step=100")
    assert code == 0, err
    # q_proj: 4 * 32 + 4 + 32 * 4, v_proj: 4 * 32 + 4 + 16 * 4, 2 layers
    assert f"trainable params: {2 * (260 + 196):,d} ||" in out
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--method", "vera", "--target-modules",
                             "embed_tokens")
    assert code == 1 and "is a Embedding, which vera cannot wrap" in err


def test_unknown_adapter_fields_of_the_new_methods_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"adapter \(vera\): unknown key 'lora_alpha'"):
        tiny_run_config(tmp_path, "adapter={method: vera, r: 8, lora_alpha: 16}")
    with pytest.raises(ValueError, match=r"adapter \(adalora\): unknown key 'intit_r' \(did you mean 'init_r'\?\)"):
        tiny_run_config(tmp_path, "adapter={method: adalora, intit_r: 8}")
    with pytest.raises(ValueError, match=r"AdaLoraConfig.target_r=9 must be at most init_r=8"):
        tiny_run_config(tmp_path, "adapter={method: adalora, init_r: 8, target_r: 9}")


def test_the_same_adalora_settings_train_when_the_run_fits(tmp_path):
    """Guards the refusals above: with a long enough run the settings train and allocate the final ranks."""
    result = run_training(tiny_run_config(tmp_path, ADALORA, "train.max_steps=4"), show_progress=False)
    assert result.steps == 4 and result.model.peft_config["default"].rank_pattern is not None
