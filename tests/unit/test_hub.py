"""push_to_hub and from_pretrained(<Hub id>) against a stand-in for the Hugging Face Hub (no network).

`FakeHub` replaces huggingface_hub's HfApi and snapshot_download: uploads land in a folder per repository, and
downloads copy from there the files the allow_patterns select (with huggingface_hub's own pattern matching), so the
tests see exactly what would be uploaded and downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from tests.tiny import tiny_llama

IDS = torch.tensor([[5, 9, 30, 31, 40, 7]])


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, dict]] = []
        hub = self

        class FakeApi:
            def __init__(self, token=None, **kwargs):
                hub.calls.append(("HfApi", {"token": token}))

            def create_repo(self, repo_id, **kwargs):
                hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
                (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
                return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

            def create_branch(self, repo_id, **kwargs):
                hub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

            def upload_folder(self, *, repo_id, folder_path, **kwargs):
                files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
                hub.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
                shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)
                return "commit-info"

        self.api = FakeApi

    def snapshot_download(self, repo_id, allow_patterns=None, **kwargs):
        self.calls.append(("snapshot_download", {"repo_id": repo_id, "allow_patterns": allow_patterns, **kwargs}))
        source = self.root / repo_id
        if not source.is_dir():
            raise OSError(f"404 Client Error: repository {repo_id} not found")
        files = [str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()]
        target = self.root.parent / "cache" / repo_id
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)
        return str(target)

    def called(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def trained(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    base = tiny_llama()
    base.config.name_or_path = "someone/tiny-llama"  # as if loaded from the Hub
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                           task_type="CAUSAL_LM"))


def test_push_to_hub_uploads_exactly_the_adapter_files_and_a_card(hub, tmp_path):
    model = trained()
    assert model.push_to_hub("me/tiny-lora", private=True, token="secret", commit_message="first") == "commit-info"
    [upload] = hub.called("upload_folder")
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert upload["repo_id"] == "me/tiny-lora" and upload["commit_message"] == "first" and not upload["create_pr"]
    assert hub.called("create_repo") == [{"repo_id": "me/tiny-lora", "private": True, "exist_ok": True,
                                          "repo_type": "model"}]
    assert hub.called("HfApi") == [{"token": "secret"}] and not hub.called("create_branch")
    # the same files save_pretrained writes, bit for bit, but the card, which names the repository
    model.save_pretrained(tmp_path / "local")
    pushed = hub.root / "me" / "tiny-lora"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pushed / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    config = json.loads((pushed / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/tiny-llama" and config["inference_mode"] is True
    card = (pushed / "README.md").read_text()
    assert "base_model: someone/tiny-llama" in card and "library_name: peft" in card
    assert "- base_model:adapter:someone/tiny-llama" in card and "pipeline_tag: text-generation" in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' not in (tmp_path / "local" / "README.md").read_text()


def test_from_pretrained_downloads_only_the_adapter_files(hub):
    model = trained()
    model.push_to_hub("me/tiny-lora")
    (hub.root / "me" / "tiny-lora" / "model.safetensors").write_bytes(b"a whole model nobody should download")
    loaded = PeftModel.from_pretrained(tiny_llama(), "me/tiny-lora", revision="v2", token="secret")
    [download] = hub.called("snapshot_download")
    assert download == {"repo_id": "me/tiny-lora", "revision": "v2", "token": "secret",
                        "allow_patterns": ["adapter_config.json", "adapter_model.safetensors", "labels.json"]}
    cached = hub.root.parent / "cache" / "me" / "tiny-lora"
    assert sorted(os.listdir(cached)) == ["adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def test_several_adapters_and_subfolder(hub):
    model = trained()
    torch.manual_seed(3)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.push_to_hub("me/two", revision="dev", create_pr=False, tags=["demo"])
    [upload] = hub.called("upload_folder")
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                               "second/adapter_config.json", "second/adapter_model.safetensors"]
    assert upload["revision"] == "dev" and hub.called("create_branch") == [
        {"repo_id": "me/two", "branch": "dev", "exist_ok": True, "repo_type": "model"}]
    assert "`second`" in (hub.root / "me" / "two" / "README.md").read_text()
    assert "- demo" in (hub.root / "me" / "two" / "README.md").read_text()
    second = PeftModel.from_pretrained(tiny_llama(), "me/two", subfolder="second")
    assert hub.called("snapshot_download")[0]["allow_patterns"] == [
        "second/adapter_config.json", "second/adapter_model.safetensors", "second/labels.json"]
    model.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(second.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)
    hub.calls.clear()
    model.push_to_hub("me/only-second", selected_adapters=["second"])
    assert hub.called("upload_folder")[0]["files"] == ["README.md", "second/adapter_config.json",
                                                       "second/adapter_model.safetensors"]


def test_subfolder_of_a_local_directory(tmp_path):
    model = trained()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), subfolder="second")
    assert loaded.peft_config["default"].r == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path), subfolder="third")


def test_hub_errors_say_what_is_wrong(hub):
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub.*not found"):
        PeftModel.from_pretrained(tiny_llama(), "me/missing")
    (hub.root / "me" / "not-an-adapter").mkdir(parents=True)
    (hub.root / "me" / "not-an-adapter" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json at its top level"):
        PeftModel.from_pretrained(tiny_llama(), "me/not-an-adapter")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['proxy'\]"):
        PeftModel.from_pretrained(tiny_llama(), "me/missing", proxy="x")
    model = trained()
    with pytest.raises(ValueError, match="safetensors only"):
        model.push_to_hub("me/x", safe_serialization=False)
    with pytest.raises(ValueError, match="repo_id must be"):
        model.push_to_hub("")
    with pytest.raises(TypeError):
        model.push_to_hub("me/x", unknown_option=1)
    assert not hub.called("upload_folder")


def test_a_lorakit_runs_card_carries_its_training(hub, tmp_path):
    """An adapter loaded from a `lorakit train` run is pushed with the run's data, steps and final metrics."""
    from lorakit.train.loop import run_training
    from tests.train_fixtures import tiny_run_config

    cfg = tiny_run_config(tmp_path, "train.max_steps=2", "data.val_size=4")
    run_training(cfg, show_progress=False)
    local_card = (Path(cfg.output_dir) / "adapter" / "README.md").read_text()
    assert "lorakit train" in local_card and "eval_loss" in local_card
    model = PeftModel.from_pretrained(tiny_llama(), cfg.output_dir)
    model.push_to_hub("me/run")
    card = (hub.root / "me" / "run" / "README.md").read_text()
    results = json.loads((Path(cfg.output_dir) / "train_results.json").read_text())
    assert "trained with: lorakit train" in card and "optimizer steps: 2" in card and "train.json" in card
    assert f"| eval_loss | {results['eval']['loss']:.4g} |" in card
    assert str(tmp_path) not in card  # no path of this machine
    assert load_file(hub.root / "me" / "run" / "adapter_model.safetensors").keys() == load_file(
        Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors").keys()
