"""Shared pieces of the PEFT interop suite: the tiny architectures, and the same adapter built in both libraries.

Each architecture (`Arch`) names real modules of its tiny model for every targeting style, so the test
files stay generic: `ARCHS["llama"].suffixes` is a dotted-suffix target list for Llama, and so on.

Adapter weights are never assumed equal because both libraries drew them from the same seed: one library
builds (and perturbs) the adapter, saves it, and the other loads the files.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn

import lorakit
from lorakit.adapter_layer import AdapterLayer
from tests.tiny import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_t5

ATOL = 1e-5  # fp32 logits of a tiny model: both libraries compute the same sums, in possibly another order
BATCH, SEQ, DECODER_SEQ = 3, 7, 5


@dataclass(frozen=True)
class Arch:
    """One tiny architecture and real module names of it for each targeting style."""

    name: str
    build: Callable[[], nn.Module]
    task_type: str
    names: list[str]  # short names, e.g. ["q_proj", "v_proj"]
    suffixes: list[str]  # dotted suffixes, e.g. ["self_attn.k_proj"]
    full_names: list[str]  # full module names (exact match)
    regex: str  # a regex over full module names
    exclude: list[str]  # exclude_modules, as a list (used with "all-linear")
    exclude_regex: str  # exclude_modules, as a regex
    layers_pattern: str  # the name of the block list ("layers", "h", "layer", "block")
    modules_to_save: list[str]
    rank_pattern: dict
    alpha_pattern: dict
    embedding: str | None  # the input embedding's short name, when LoRA on it is tested
    generates: bool  # has .generate (not a classifier)
    extra: dict = field(default_factory=dict)  # config fields every adapter of this arch gets

    def inputs(self, batch: int = BATCH, seed: int = 1) -> dict[str, torch.Tensor]:
        """Random token ids (no special tokens), full attention mask; T5 also gets decoder ids."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 200, (batch, SEQ), generator=gen)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.task_type == "SEQ_2_SEQ_LM":
            out["decoder_input_ids"] = torch.randint(5, 200, (batch, DECODER_SEQ), generator=gen)
        return out


ARCHS = {
    "llama": Arch(
        name="llama", build=tiny_llama, task_type="CAUSAL_LM",
        names=["q_proj", "v_proj"],
        suffixes=["self_attn.k_proj", "mlp.down_proj"],
        full_names=["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.up_proj"],
        regex=r"model\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.gate_proj)",
        exclude=["down_proj", "layers.0.self_attn.q_proj"],
        exclude_regex=r".*\.mlp\..*",
        layers_pattern="layers",
        modules_to_save=["lm_head", "model.norm"],
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
        alpha_pattern={"v_proj": 32, r"model\.layers\.0\.self_attn\.k_proj": 3},
        embedding="embed_tokens", generates=True,
    ),
    "gpt2": Arch(
        name="gpt2", build=tiny_gpt2, task_type="CAUSAL_LM",
        names=["c_attn"],
        suffixes=["attn.c_proj", "mlp.c_fc"],
        full_names=["transformer.h.1.mlp.c_proj"],
        regex=r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_proj)",
        exclude=["mlp.c_proj"],
        exclude_regex=r".*\.h\.0\..*",
        layers_pattern="h",
        modules_to_save=["ln_f"],
        rank_pattern={"c_attn": 2, r"h\.1\.mlp\.c_fc": 6},
        alpha_pattern={"attn.c_proj": 32},
        embedding="wte", generates=True,
        extra={"fan_in_fan_out": True},  # GPT-2's Conv1D stores weights transposed
    ),
    "bert": Arch(
        name="bert", build=tiny_bert_classifier, task_type="SEQ_CLS",
        names=["query", "value"],
        suffixes=["attention.self.key", "output.dense"],
        full_names=["bert.encoder.layer.1.intermediate.dense"],
        regex=r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|key)",
        exclude=["intermediate.dense", "pooler.dense"],
        exclude_regex=r".*attention.*",
        layers_pattern="layer",
        modules_to_save=["pooler"],  # on top of the classifier, which SEQ_CLS adds by itself
        rank_pattern={"query": 2, r"layer\.1\.output\.dense": 6},
        alpha_pattern={"value": 32},
        embedding="word_embeddings", generates=False,
    ),
    "t5": Arch(
        name="t5", build=tiny_t5, task_type="SEQ_2_SEQ_LM",
        names=["q", "v"],
        suffixes=["EncDecAttention.k", "DenseReluDense.wo"],
        full_names=["decoder.block.1.layer.0.SelfAttention.o"],
        regex=r"(encoder|decoder)\.block\.\d+\.layer\.0\.SelfAttention\.(q|k)",
        exclude=["wi", "decoder.block.0.layer.1.EncDecAttention.q"],
        exclude_regex=r"decoder\..*",
        layers_pattern="block",
        modules_to_save=["final_layer_norm"],  # encoder's and decoder's
        rank_pattern={"q": 2, r"decoder\.block\.1\..*\.o": 6},
        alpha_pattern={"k": 32},
        embedding=None, generates=True,  # T5's embedding is shared three ways; not a LoRA target here
    ),
}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine the threads' contention made
    this folder 3x slower. Restored after each test, so other folders keep their setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def same_matmul_kernels_as_peft(monkeypatch):
    """PEFT's layers multiply with PyTorch's own kernels (MKL on CPU); lorakit's fused LoRA layer picks oneDNN
    for CPU fp32 where it is faster (lorakit/ops/matmul.py), which sums in another order. These tests compare
    the math, several of them bit for bit, so both libraries run the same kernels here;
    tests/unit/test_fast_path.py compares the two kernel choices."""
    monkeypatch.setenv("LORAKIT_MATMUL", "aten")


def arch_params(only: Callable[[Arch], bool] = lambda a: True) -> list:
    return [pytest.param(a, id=a.name) for a in ARCHS.values() if only(a)]


# ---- the same config in both libraries -------------------------------------------------------------

def peft_config(arch: Arch, **options) -> peft.LoraConfig:
    """A fresh PEFT LoraConfig (PEFT rewrites target_modules in place, so never share one)."""
    return peft.LoraConfig(task_type=arch.task_type, **copy.deepcopy({**arch.extra, **options}))


def our_config(arch: Arch, **options) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(task_type=arch.task_type, **copy.deepcopy({**arch.extra, **options}))


def build_peft(arch: Arch, adapters: dict[str, dict], seed: int = 0) -> peft.PeftModel:
    """A PEFT model with one adapter per entry (init_lora_weights=False, then every trainable tensor perturbed),
    first adapter active."""
    return _build(arch, adapters, seed, peft.get_peft_model, peft_config)


def build_ours(arch: Arch, adapters: dict[str, dict], seed: int = 0) -> lorakit.PeftModel:
    return _build(arch, adapters, seed, lorakit.get_peft_model, our_config)


def _build(arch, adapters, seed, get_peft_model, make_config):
    model = None
    for i, (name, options) in enumerate(adapters.items()):
        torch.manual_seed(seed + i)
        config = make_config(arch, **{"init_lora_weights": False, **options})
        if model is None:
            model = get_peft_model(arch.build(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)  # makes exactly this adapter's tensors trainable, for perturb_trainable
        perturb_trainable(model, seed=1000 + seed + i)
    model.set_adapter(next(iter(adapters)))
    return model.eval()


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Add noise to every trainable tensor, so trainable copies (modules_to_save) and trained biases differ
    from the base model, and a wrongly loaded tensor shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=gen) * std)


def peft_from_pretrained(arch: Arch, directory, **kwargs) -> peft.PeftModel:
    """peft.PeftModel.from_pretrained on a fresh base, failing on any warning about missing/unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(arch.build(), str(directory), **kwargs)
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, f"PEFT warned while loading lorakit's files: {key_warnings}"
    return model.eval()


def peft_load_adapter(model: peft.PeftModel, directory, adapter_name: str) -> None:
    """PeftModel.load_adapter, failing unless every tensor of the file found its place and none was missing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.load_adapter(str(directory), adapter_name=adapter_name)
    assert not result.missing_keys, f"PEFT found missing keys: {result.missing_keys}"
    assert not result.unexpected_keys, f"PEFT found unexpected keys: {result.unexpected_keys}"
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings


# ---- observing a model ----------------------------------------------------------------------------

def adapter_layer_names(model: nn.Module) -> set[str]:
    """Names of the modules holding LoRA (lorakit's AdapterLayer or PEFT's LoraLayer)."""
    return {n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, PeftLoraLayer))}


def lora_settings(model: nn.Module, adapter: str = "default") -> dict[str, tuple]:
    """module name -> (r, lora_alpha, scaling) of `adapter`, read from either library's layers (scaling rounded,
    as alpha / sqrt(r) may differ in the last bit between the two computations)."""
    return {n: (m.r[adapter], m.lora_alpha[adapter], round(float(m.scaling[adapter]), 10))
            for n, m in model.named_modules()
            if isinstance(m, (AdapterLayer, PeftLoraLayer)) and adapter in m.r}


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return model(**inputs, **kwargs).logits


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


def assert_adapter_acts(adapted: torch.Tensor, base: torch.Tensor) -> None:
    """Guard for the equality checks: the adapter under test must change the output."""
    assert (adapted - base).abs().max() > 1e-3, "the adapter does not change the logits; the test would prove nothing"


def base_logits(arch: Arch, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits(arch.build(), inputs)
