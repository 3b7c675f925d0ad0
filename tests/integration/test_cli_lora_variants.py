"""LoRA variants from the run config: `lorakit train` with DoRA, PiSSA, LoRA-FA; `lorakit inspect` counts them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.train.config import load_run_config
from lorakit.train import precision
from lorakit.train.loop import run_training
from tests.integration.cli_support import ALPACA_ROWS, make_model_dir, run_cli, write_jsonl

RUN_YAML = """\
model: {model}
adapter: {adapter}
data: {{path: {data}, val_size: 2, cutoff_len: 64}}
train: {{learning_rate: 1.0e-2, max_steps: 4, batch_size: 4, logging_steps: 1{train}}}
eval: {{generate: false}}
output_dir: {out}
"""


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_variants")
    return root, make_model_dir(root / "model"), write_jsonl(root / "train.jsonl", ALPACA_ROWS)


def train_yaml(workspace, name: str, adapter: str, train: str = ""):
    """Write a run config for a tiny run; returns (config path, output_dir)."""
    root, model, data = workspace
    config = root / f"{name}.yaml"
    out = root / name
    config.write_text(RUN_YAML.format(model=model, adapter=adapter, data=data, out=out, train=train))
    return config, out


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("name,adapter", [
    ("dora", "{method: lora, r: 4, target_modules: all-linear, use_dora: true}"),
    ("pissa", "{method: lora, r: 4, target_modules: all-linear, init_lora_weights: pissa}"),
])
def test_train_a_variant_from_yaml(workspace, capsys, name, adapter):
    config, out = train_yaml(workspace, name, adapter)
    code, _, err = run_cli(capsys, "train", config, "--no-progress")
    assert code == 0, err
    saved = lorakit.LoraConfig.from_pretrained(str(out / "adapter"))
    assert (saved.use_dora, saved.init_lora_weights) == ((True, True) if name == "dora" else (False, "pissa"))
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in weights) == (name == "dora")
    curve = losses(out)
    assert len(curve) == 4 and curve[-1] < curve[0]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_trained_residual_init_adapter_reloads_on_the_original_base(workspace, capsys, init):
    """The saved config says init_lora_weights=pissa: loading re-derives the same residual from the original base,
    then puts the trained A, B in, which gives back the trained model.

    Under the default precision (bf16 here: this CPU has AVX512-BF16) the run computed the residual from the fp32
    weights, in fp32, then trained against its bf16 rounding; the model it returns is fp32 again, holding those
    rounded values (train/precision.py). So a reload on the fp32 base equals it to within bf16 rounding of the
    frozen weights, and exactly once its frozen weights are rounded the same way (which fails if the residual
    had been computed from bf16 weights)."""
    config, out = train_yaml(workspace, f"reload-{init}",
                             f"{{method: lora, r: 4, target_modules: [q_proj, v_proj], init_lora_weights: {init}}}")
    result = run_training(load_run_config(str(config)), show_progress=False)
    assert precision.resolve_bf16(load_run_config(str(config)).train.bf16, torch.device("cpu"))  # the bf16 path ran
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits
        bf16_rounding = 2 ** -8 * float(trained.abs().max())
        base = AutoModelForCausalLM.from_pretrained(workspace[1])
        assert (base(input_ids=ids).logits - trained).abs().max() > 10 * bf16_rounding  # it trained
        loaded = lorakit.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=bf16_rounding, rtol=0)
        precision.restore_stored_dtypes(loaded, precision.store_frozen_weights_in_bf16(loaded))
        assert torch.equal(loaded(input_ids=ids).logits, trained)
    # lorakit merge on the output directory: the same model, merged
    merged_dir = workspace[0] / f"merged-{init}"
    code, _, err = run_cli(capsys, "merge", "--adapter", out / "adapter", "--output", merged_dir)
    assert code == 0, err
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=bf16_rounding, rtol=0)
    code, _, err = run_cli(capsys, "generate", "--adapter", out / "adapter", "--prompt", "add 2 and 1",
                           "--max-new-tokens", 3)
    assert code == 0, err


def test_lora_fa_from_yaml_trains_only_b(workspace, capsys):
    config, out = train_yaml(workspace, "lora_fa", "{method: lora, r: 4, target_modules: [q_proj, v_proj]}",
                             ", lora_fa: true")
    code, printed, err = run_cli(capsys, "train", config, "train.save_steps=2", "--no-progress")
    assert code == 0, err
    trainable = load_file(out / "checkpoint-2" / "trainable.safetensors")
    assert trainable and all(".lora_B." in k for k in trainable)
    results = json.loads((out / "train_results.json").read_text())
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(workspace[1]),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    b_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_B." in n)
    assert results["trainable_params"] == b_params
    # A never moved: the saved A equals a fresh init from the same seed
    torch.manual_seed(42)  # train.seed's default: the adapter's init depends on it only
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(workspace[1]),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, tensor in fresh.adapter_state_dict().items():
        if ".lora_A." in key:
            assert torch.equal(saved[key], tensor), key


def test_method_options_of_another_method_are_refused(workspace, tmp_path):
    root, model, data = workspace
    base = {"model": str(model), "data": {"path": str(data)}, "output_dir": str(tmp_path / "o")}
    with pytest.raises(ValueError, match=r"train.lora_fa=True does not apply to finetuning_type full"):
        load_run_config(None, ["finetuning_type=full", "train.lora_fa=true"], base=base)
    with pytest.raises(ValueError, match=r"train.lora_fa must be true or false"):
        load_run_config(None, ["train.lora_fa=maybe"], base={**base, "adapter": {"method": "lora"}})


def test_inspect_counts_dora_magnitudes(workspace, capsys):
    _, model_dir, _ = workspace
    code, out, err = run_cli(capsys, "inspect", "--model", model_dir, "--no-tree", "--target-modules", "q_proj",
                             "v_proj", "--r", 4, "--option", "use_dora=true")
    assert code == 0, err
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    trainable, total = dora.get_nb_trainable_parameters()
    magnitudes = 2 * (32 + 16)  # one per output row: q_proj 32, v_proj 16 (two key/value heads of 8), 2 layers
    assert trainable == plain.get_nb_trainable_parameters()[0] + magnitudes
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in out and "use_dora=True" in out
