"""LoRA on nn.Conv1d, nn.Conv3d, grouped convolutions and nn.MultiheadAttention against PEFT: the same config gives
the same trainable parameters in both libraries, adapter files cross in both directions with identical outputs,
merges give the same weights, and mixed-adapter batches agree where PEFT has them (not on attention).

One deliberate difference: PEFT 0.21 adds a MultiheadAttention's out_proj update twice (its merge() writes
W + dW into out_proj, then calls out_proj.merge(), which adds dW again; its forward merges, so outputs have it
too; huggingface/peft#3774 fixes it). lorakit adds it once, as the config says. The comparisons halve PEFT's
out_proj scaling (`peft_out_proj_once`), which makes PEFT's result W + dW, so everything else is checked exactly;
test_peft_adds_the_attention_out_proj_update_twice pins the difference down.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from tests.interop.conftest import perturb_trainable

pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")

WEIGHTS = "adapter_model.safetensors"
ATOL = 1e-5


class LayerZoo(nn.Module):
    """Linear -> MultiheadAttention (sequence first) -> Conv1d -> grouped Conv1d -> grouped Conv2d -> Conv3d -> head.
    Input (B, 8, 6)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, num_heads=4)
        self.conv1d = nn.Conv1d(16, 8, kernel_size=3, padding=1)
        self.grouped1d = nn.Conv1d(8, 8, kernel_size=3, padding=1, groups=2)
        self.grouped2d = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=4)
        self.conv3d = nn.Conv3d(2, 4, kernel_size=2)
        self.head = nn.Linear(84, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).transpose(0, 1)  # (T, B, 16)
        h = self.mha(h, h, h)[0].transpose(0, 1)  # (B, T, 16)
        h = torch.tanh(self.conv1d(h.transpose(1, 2)))  # (B, 8, T)
        h = self.grouped1d(h)  # (B, 8, T)
        b, _, t = h.shape
        h = self.grouped2d(h.view(b, 4, 2, t))  # (B, 8, 2, T)
        h = self.conv3d(h.view(b, 2, 4, 2, t))  # (B, 4, 3, 1, T - 1)
        return self.head(h.flatten(1))


INPUT = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(1))
ALL = ["proj", "mha", "conv1d", "grouped1d", "grouped2d", "conv3d"]
CONVS = ["conv1d", "grouped1d", "grouped2d", "conv3d"]
CONFIGS = {
    "mha": dict(target_modules=["mha"]),
    "conv1d-conv3d": dict(target_modules=["conv1d", "conv3d"], lora_alpha=16),
    "grouped": dict(target_modules=["grouped1d", "grouped2d"]),
    "all": dict(target_modules=ALL, r=8, rank_pattern={"conv3d": 2, "mha": 4}, alpha_pattern={"grouped2d": 3},
                bias="lora_only", modules_to_save=["head"]),
    "all-rslora-bias": dict(target_modules=ALL, use_rslora=True, bias="all"),
    "dora-convs": dict(target_modules=CONVS + ["proj"], use_dora=True),
    "dora-ungrouped": dict(target_modules=["conv1d", "conv3d"], use_dora=True, lora_alpha=4),
}
MERGEABLE = ["mha", "conv1d-conv3d", "dora-ungrouped"]  # no grouped convolution: those merge in neither library


def peft_out_proj_once(model: peft.PeftModel) -> peft.PeftModel:
    """Halve the out_proj scaling of PEFT's MultiheadAttention layers, so that its doubled update is W + dW."""
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.layer.MultiheadAttention):
            out_proj = module.base_layer.out_proj
            for name in out_proj.scaling:
                out_proj.scaling[name] /= 2
    return model


def build(library, options: dict, seed: int = 0):
    """A random adapter (init_lora_weights=False, then every trainable tensor perturbed) in `library`."""
    torch.manual_seed(seed)
    config = library.LoraConfig(**{"r": 4, "init_lora_weights": False, **options})
    model = library.get_peft_model(LayerZoo(), config)
    perturb_trainable(model, seed=1000 + seed)
    return model.eval()


def load_peft(directory) -> peft.PeftModel:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(LayerZoo(), str(directory))
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    return peft_out_proj_once(model.eval())


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT)


def assert_acts(out: torch.Tensor) -> None:
    assert (out - LayerZoo()(INPUT)).abs().max() > 1e-3, "the adapter does not change the output"


@pytest.mark.parametrize("name", CONFIGS)
def test_same_trainable_parameters_as_peft(name):
    ours, theirs = build(lorakit, CONFIGS[name]), build(peft, CONFIGS[name])

    def shapes(model):
        # PEFT's DoRA magnitude is a module (`lora_magnitude_vector.<adapter>.weight`), lorakit's a Parameter (both
        # files say `lora_magnitude_vector`)
        return {n.replace(".default.weight", ".default") if "lora_magnitude_vector" in n else n: tuple(p.shape)
                for n, p in model.named_parameters() if p.requires_grad}

    assert shapes(ours) == shapes(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", CONFIGS)
def test_peft_files_load_in_lorakit(name, tmp_path):
    theirs = build(peft, CONFIGS[name])
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(LayerZoo(), str(tmp_path)).eval()
    expected = output(peft_out_proj_once(theirs))
    assert_acts(expected)
    torch.testing.assert_close(output(ours), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_lorakit_files_load_in_peft(name, tmp_path):
    ours = build(lorakit, CONFIGS[name])
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = load_peft(tmp_path / "ours")
    expected = output(ours)
    assert_acts(expected)
    torch.testing.assert_close(output(theirs), expected, atol=ATOL, rtol=0)
    build(peft, CONFIGS[name]).save_pretrained(tmp_path / "peft")
    ours_file, peft_file = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "peft" / WEIGHTS)
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}


@pytest.mark.parametrize("name", MERGEABLE)
def test_merges_give_peft_s_weights(name, tmp_path):
    theirs = build(peft, CONFIGS[name])
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(LayerZoo(), str(tmp_path)).eval()
    expected = output(peft_out_proj_once(theirs))
    ours_merged, theirs_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(ours_merged.mha.out_proj) is type(theirs_merged.mha.out_proj)
    ours_state, theirs_state = ours_merged.state_dict(), theirs_merged.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(output(ours_merged), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["conv1d-conv3d", "grouped"])
def test_mixed_batches_on_convolutions_agree_with_peft(name, tmp_path):
    """PEFT routes rows to adapters on convolutions (not with DoRA, nor on MultiheadAttention, where lorakit also
    does: see tests/conformance and tests/unit/test_lora_layer_types.py)."""
    build(peft, CONFIGS[name], seed=0).save_pretrained(tmp_path / "a")
    build(peft, CONFIGS[name], seed=5).save_pretrained(tmp_path / "b")
    theirs = peft.PeftModel.from_pretrained(LayerZoo(), str(tmp_path / "a"), adapter_name="a").eval()
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ours = lorakit.PeftModel.from_pretrained(LayerZoo(), str(tmp_path / "a"), adapter_name="a").eval()
    ours.load_adapter(str(tmp_path / "b"), adapter_name="b")
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        expected = theirs(INPUT, adapter_names=names)
        torch.testing.assert_close(ours(INPUT, adapter_names=names), expected, atol=ATOL, rtol=0)


def test_peft_adds_the_attention_out_proj_update_twice(tmp_path):
    """The one difference in outputs (module docstring): unmodified PEFT equals lorakit with out_proj's scaling
    doubled. When PEFT fixes it (huggingface/peft#3774), this fails: drop peft_out_proj_once then."""
    theirs = build(peft, CONFIGS["mha"])
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(LayerZoo(), str(tmp_path)).eval()
    expected = output(theirs)
    assert (output(ours) - expected).abs().max() > 1e-3
    ours.get_base_model().mha.base_layer.out_proj.scaling["default"] *= 2
    torch.testing.assert_close(output(ours), expected, atol=ATOL, rtol=0)
