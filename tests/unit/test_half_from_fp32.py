"""An fp32 checkpoint loaded in bf16 / fp16 (models/half_from_fp32.py): loaded in fp32 as views of the mapped file,
then cast weight by weight with the file's pages given back. Checked against transformers' own half-precision
load, tensor by tensor, on each architecture the tests have; where the cast would not give the same model (a
module kept in fp32, a weight missing from the file, a non-fp32 file) the usual load runs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.file_pages import FileMappings
from lorakit.models import half_from_fp32, loading
from lorakit.models.loading import TASK_AUTO_CLASSES, load_model_and_tokenizer
from tests.tiny import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_t5, tiny_tokenizer
from tests.train_fixtures import assert_same_tensors

ARCHITECTURES = {  # name -> (builder, task type)
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),  # Conv1D weights, a tied head
    "bert": (tiny_bert_classifier, "SEQ_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),  # `wo` kept in fp32 by the architecture: the usual load
}


def save_fp32(directory, build) -> str:
    directory = str(directory)
    build().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def calls(monkeypatch):
    """Records whether load_half_from_fp32 returned a model (True) or left the load to transformers (False)."""
    taken = []
    original = half_from_fp32.load_half_from_fp32

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        taken.append(model is not None)
        return model

    monkeypatch.setattr(loading, "load_half_from_fp32", recording)
    return taken


def assert_same_model(got, expected) -> None:
    got_tensors = dict((*got.named_parameters(), *got.named_buffers()))
    expected_tensors = dict((*expected.named_parameters(), *expected.named_buffers()))
    assert_same_tensors(got_tensors, expected_tensors)
    assert {n: t.dtype for n, t in got_tensors.items()} == {n: t.dtype for n, t in expected_tensors.items()}
    assert got.config.dtype == expected.config.dtype
    tied = [n for n, _ in expected.named_parameters(remove_duplicate=False)]
    assert [n for n, _ in got.named_parameters(remove_duplicate=False)] == tied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_same_model_as_transformers_half_precision_load(tmp_path, calls, architecture, dtype):
    build, task_type = ARCHITECTURES[architecture]
    directory = save_fp32(tmp_path / architecture, build)
    kwargs = {"num_labels": 3} if task_type == "SEQ_CLS" else {}
    got, _ = load_model_and_tokenizer(directory, task_type, dtype=dtype, device="cpu", **kwargs)
    expected = TASK_AUTO_CLASSES[task_type].from_pretrained(directory, dtype=dtype, **kwargs)
    assert_same_model(got, expected)
    assert calls == [architecture != "t5"]


def test_the_cast_gives_the_files_pages_back(tmp_path, monkeypatch):
    """Each weight is cast from a view of the mapped file, whose pages are then released."""
    directory = save_fp32(tmp_path / "llama", tiny_llama)
    released = []
    original = half_from_fp32.cast_in_place

    def recording(param, dtype, mappings):
        released.append(FileMappings.read().holds(param.data))
        original(param, dtype, mappings)

    monkeypatch.setattr(half_from_fp32, "cast_in_place", recording)
    model, _ = load_model_and_tokenizer(directory, dtype="bfloat16", device="cpu")
    assert released and all(released)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_other_files_and_dtypes_load_as_usual(tmp_path, calls):
    fp32 = save_fp32(tmp_path / "fp32", tiny_llama)
    for dtype in (None, "float32", "auto"):
        load_model_and_tokenizer(fp32, dtype=dtype, device="cpu")
    load_model_and_tokenizer(fp32, dtype="bfloat16", device="cpu", quantization="nf4")  # quantization's own path
    assert calls == [False] * 3  # asked, declined: not a half dtype; NF4 does not ask
    mixed = tmp_path / "mixed"  # one tensor stored in bf16: not an fp32 file
    save_fp32(mixed, tiny_llama)
    tensors = load_file(str(mixed / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    got, _ = load_model_and_tokenizer(str(mixed), dtype="bfloat16", device="cpu")
    assert calls == [False] * 4
    assert_same_model(got, TASK_AUTO_CLASSES["CAUSAL_LM"].from_pretrained(str(mixed), dtype=torch.bfloat16))


def test_a_weight_missing_from_the_file_loads_as_usual(tmp_path, calls):
    """A weight transformers initialises would be initialised in fp32 and cast: not what its bf16 load gives."""
    directory = tmp_path / "missing"
    save_fp32(directory, tiny_llama)
    tensors = load_file(str(directory / "model.safetensors"))
    dropped = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    del tensors[dropped]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(0)
    got, _ = load_model_and_tokenizer(str(directory), dtype="bfloat16", device="cpu")
    assert calls == [False]
    assert got.get_parameter(dropped).dtype == torch.bfloat16


def test_an_architecture_without_a_skeleton_loads_as_usual(tmp_path, calls, monkeypatch):
    """The dtype check builds the architecture on the meta device; where that fails, the usual load runs."""
    directory = save_fp32(tmp_path / "llama", tiny_llama)

    def refuse(*args, **kwargs):
        raise ValueError("cannot build this one from its config")

    monkeypatch.setattr(TASK_AUTO_CLASSES["CAUSAL_LM"], "from_config", refuse)
    got, _ = load_model_and_tokenizer(directory, dtype="bfloat16", device="cpu")
    assert calls == [False]
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}
