"""`lorakit inspect`: the compact module tree, the target candidates, and what an adapter config trains."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.cli.module_tree import tree_lines
from tests.integration.cli_support import make_model_dir, run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli_inspect") / "model")


def expected_trainable_line(model_dir, **config) -> str:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**config))
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def test_tree_candidates_and_adapter_size(model_dir, capsys):
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--target-modules", "all-linear", "--r", 8)
    assert code == 0, err
    assert "layers.0-1: 2 x LlamaDecoderLayer" in out and "layers.0:" not in out
    assert "q_proj: Linear(32 -> 32)" in out and "embed_tokens: Embedding(272 x 32)" in out
    candidates = out.split("target candidates")[1].split("adapter:")[0]
    rows = {line.split()[0]: line.split() for line in candidates.splitlines()[2:] if line.strip()}
    assert rows["k_proj"][:6] == ["k_proj", "Linear", "32", "->", "16", "2"]
    assert "output head" in " ".join(rows["lm_head"])
    assert "adapter: lora r=8" in out and "target_modules='all-linear'" in out
    assert "wrapped modules: 14 (q_proj x 2, k_proj x 2, v_proj x 2, o_proj x 2, gate_proj x 2" in out
    assert expected_trainable_line(model_dir, r=8, target_modules="all-linear") in out


def test_list_targets_and_extra_options(model_dir, capsys):
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--no-tree", "--target-modules", "q_proj",
                             "v_proj", "--r", 2, "--option", "use_rslora=true", "--layers-to-transform", 1)
    assert code == 0, err
    assert "module tree" not in out
    assert "wrapped modules: 2 (q_proj x 1, v_proj x 1)" in out and "use_rslora=True" in out
    assert expected_trainable_line(model_dir, r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=1) in out


def test_inspect_a_run_config(model_dir, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\nadapter: {{r: 4, target_modules: [q_proj, k_proj]}}\n"
                      f"data: {{path: {tmp_path / 'not-needed.jsonl'}}}\noutput_dir: {tmp_path / 'out'}\n")
    code, out, err = run_cli(capsys, "inspect", "--config", config, "--no-tree")
    assert code == 0, err
    assert "wrapped modules: 4 (q_proj x 2, k_proj x 2)" in out
    assert expected_trainable_line(model_dir, r=4, target_modules=["q_proj", "k_proj"]) in out


def test_inspect_bad_inputs(model_dir, capsys, tmp_path):
    cases = [
        (["--model", model_dir, "--target-modules", "qproj"], "matched no module"),
        (["--model", model_dir, "--option", "use_rslor=true"], "did you mean 'use_rslora'"),
        (["--model", model_dir, "--r", 0], "r must be a positive integer"),
        (["--model", tmp_path / "nothing"], "does not exist"),
        (["--config", tmp_path / "missing.yaml"], "not found"),
        ([], "--model (or --config) is required"),
        (["--config", tmp_path / "run.yaml", "--r", 4], "either --config or adapter options (--r)"),
    ]
    for args, expected in cases:
        code, out, stderr = run_cli(capsys, "inspect", *args)
        assert code == 1, args
        assert out == "" and stderr.startswith("lorakit: error: ") and expected in stderr, stderr


def test_tree_collapses_only_identical_neighbours():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 3), nn.Linear(2, 2)])

    assert tree_lines(Net()) == [
        "Net: 27 parameters",
        "  blocks.0-1: 2 x Linear(2 -> 2, bias)",
        "  blocks.2: Linear(2 -> 3, bias)",
        "  blocks.3: Linear(2 -> 2, bias)",
    ]
