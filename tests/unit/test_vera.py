"""VeRA (methods/vera): the shared projections, the layer equation, parameter counts, saved state, several adapters
on one model, and bad input. Interop with PEFT is in tests/interop/test_vera_interop.py."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import PeftModel, VeraConfig, get_peft_model
from lorakit.methods.vera.projections import generate_projections
from tests.tiny import tiny_gpt2, tiny_llama
from tests.toy_task import train_on_toy_task


class Mixed(nn.Module):
    """Layers of different shapes: Linear 8 -> 12, Conv1D 12 -> 20 (weight (12, 20)), Linear 20 -> 6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 12)
        self.b = Conv1D(20, 12)
        nn.init.normal_(self.b.weight, std=0.2)
        self.c = nn.Linear(20, 6)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def random_lambdas(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def test_projections_are_kaiming_uniform_from_one_cpu_generator():
    """The algorithm written out: A (r, d_in) first, then B (d_out, r), bound sqrt(6 / fan_in), one generator."""
    a, b = generate_projections(seed=7, r=4, in_features=20, out_features=12)
    gen = torch.Generator().manual_seed(7)
    expected_a = torch.empty(4, 20).uniform_(-math.sqrt(6 / 20), math.sqrt(6 / 20), generator=gen)
    expected_b = torch.empty(12, 4).uniform_(-math.sqrt(6 / 4), math.sqrt(6 / 4), generator=gen)
    torch.testing.assert_close(a, expected_a, rtol=0, atol=1e-7)
    torch.testing.assert_close(b, expected_b, rtol=0, atol=1e-7)
    assert not torch.equal(generate_projections(8, 4, 20, 12)[0], a)


def test_projections_cover_the_largest_layer_and_each_layer_uses_its_block():
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "b", "c"], init_weights=False))
    vera_a, vera_b = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    assert vera_a.shape == (4, 20) and vera_b.shape == (20, 4)  # largest d_in = 20 (c), largest d_out = 20 (b)
    assert torch.equal((vera_a, vera_b)[0], generate_projections(0, 4, 20, 20)[0])
    random_lambdas(model)
    inner = model.get_base_model()
    for name, (d_in, d_out) in {"a": (8, 12), "b": (12, 20), "c": (20, 6)}.items():
        layer = inner.get_submodule(name)
        lam_b, lam_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
        # h = W0 x + diag(b) B[:d_out] diag(d) A[:, :d_in] x
        delta = torch.diag(lam_b) @ vera_b[:d_out] @ torch.diag(lam_d) @ vera_a[:, :d_in]
        x = torch.randn(3, d_in)
        expected = layer.base_layer(x) + x @ delta.T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        weight = layer.delta_weight("default")
        torch.testing.assert_close(weight, delta.T if name == "b" else delta, atol=1e-6, rtol=1e-6)


def test_identity_init_and_trainable_counts():
    base_out = Mixed()(X)
    model = get_peft_model(Mixed(), VeraConfig(r=16, target_modules=["a", "b", "c"], d_initial=0.05))
    torch.testing.assert_close(model(X), base_out, atol=0, rtol=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # per layer: vera_lambda_d (r) + vera_lambda_b (d_out); the projections are buffers and never train
    assert sum(p.numel() for p in trainable.values()) == 3 * 16 + (12 + 20 + 6)
    assert all(torch.all(p == 0.05) for n, p in trainable.items() if "vera_lambda_d" in n)
    assert all(torch.all(p == 0) for n, p in trainable.items() if "vera_lambda_b" in n)
    buffers = dict(model.named_buffers())
    assert "base_model.vera_A.default" in buffers and "base_model.vera_B.default" in buffers
    assert not any(".vera_A." in n for n in buffers if n.startswith("base_model.model."))  # not once per layer


def test_trained_lambdas_change_the_output_and_gradients_reach_only_lambdas():
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "c"]))
    model(X).pow(2).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {f"base_model.model.{m}.vera_lambda_{v}.default" for m in "ac" for v in "bd"}
    assert model.base_model.vera_A["default"].grad is None


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_projection_decides_what_the_file_holds(tmp_path, save_projection):
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "b"], save_projection=save_projection))
    random_lambdas(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    assert "base_model.model.a.vera_lambda_b" in keys and len([k for k in keys if "vera_lambda" in k]) == 4
    loaded = PeftModel.from_pretrained(Mixed(), str(tmp_path))
    assert torch.equal(loaded(X), model(X))  # regenerated from the seed when not saved


def test_a_file_with_projections_overrides_the_seed(tmp_path):
    """Saved projections are authoritative: a file made with another seed loads exactly (the file's A and B)."""
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a"], projection_prng_key=3))
    random_lambdas(model)
    model.save_pretrained(tmp_path)
    other_seed = VeraConfig(r=4, target_modules=["a"], projection_prng_key=5)
    loaded = PeftModel.from_pretrained(Mixed(), str(tmp_path), config=other_seed)
    assert torch.equal(loaded.base_model.vera_A["default"], model.base_model.vera_A["default"])
    assert torch.equal(loaded(X), model(X))


def test_projections_follow_the_model_and_go_with_the_last_adapter():
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a"]))
    model.to(torch.float64)
    assert model.base_model.vera_A["default"].dtype == torch.float64
    layer = model.get_base_model().a
    assert layer.projections[0] is model.base_model.vera_A  # layers read the host's, never a stale copy
    model.add_adapter("second", VeraConfig(r=4, target_modules=["a"]))
    model.set_adapter("second")
    model.delete_adapter("default")
    assert model.base_model.vera_A.keys() == ["second"] and model.base_model.vera_B.keys() == ["second"]
    model.tuners["second"].remove()  # what deleting the last VeRA adapter does
    assert "vera_A" not in dict(model.base_model.named_children())


def test_a_second_adapter_shares_the_first_ones_projections():
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "b", "c"]))
    model.add_adapter("small", VeraConfig(r=4, target_modules=["a"]))  # d_in 8, d_out 12: fits in (20, 20)
    first_a, first_b = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    small_a, small_b = model.base_model.vera_A["small"], model.base_model.vera_B["small"]
    assert small_a.shape == (4, 8) and small_b.shape == (12, 4)
    assert torch.equal(small_a, first_a[:, :8]) and torch.equal(small_b, first_b[:12])
    assert small_a.data_ptr() != first_a.data_ptr()  # a copy: loading one adapter's file never changes the other


def test_a_second_adapter_with_the_same_shapes_has_the_same_projections_as_a_fresh_one(tmp_path):
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "c"]))
    model.add_adapter("other", VeraConfig(r=4, target_modules=["a", "c"], init_weights=False))
    model.save_pretrained(tmp_path)
    alone = PeftModel.from_pretrained(Mixed(), str(tmp_path / "other"))
    model.set_adapter("other")
    assert torch.equal(alone(X), model(X))


SHARING_ERRORS = {
    "larger layer": (dict(r=4, target_modules=["b", "c"]), dict(r=4, target_modules=["a"]),
                     r"VeraConfig.target_modules: b \(d_in=12, d_out=20\) cannot share the VeRA projections of "
                     r"adapter 'default', which cover d_in <= 8 and d_out <= 12"),
    "other rank": (dict(r=8, target_modules=["a"]), dict(r=4, target_modules=["a"]),
                   r"VeraConfig.r=8: .* whose rank is 4; use r=4"),
    "other seed": (dict(r=4, target_modules=["a"], projection_prng_key=1), dict(r=4, target_modules=["a"]),
                   r"VeraConfig.projection_prng_key=1: .* must be 0"),
    "other save_projection": (dict(r=4, target_modules=["a"], save_projection=False), dict(r=4, target_modules=["a"]),
                              r"VeraConfig.save_projection=False: .* must be True"),
    "unsaved block": (dict(r=4, target_modules=["a"], save_projection=False),
                      dict(r=4, target_modules=["a", "b"], save_projection=False),
                      r"save_projection=False with target_modules whose largest layer is d_in=8, d_out=12: .* "
                      r"cannot regenerate"),
}


@pytest.mark.parametrize("second,first,message", SHARING_ERRORS.values(), ids=SHARING_ERRORS.keys())
def test_adapters_that_cannot_share_the_projections_are_refused(second, first, message):
    model = get_peft_model(Mixed(), VeraConfig(**first))
    before = model(X)
    with pytest.raises(ValueError, match=message):
        model.add_adapter("second", VeraConfig(**second))
    assert list(model.peft_config) == ["default"] and model.base_model.vera_A.keys() == ["default"]
    assert torch.equal(model(X), before)


def test_layer_types_vera_cannot_wrap_are_refused():
    with pytest.raises(TypeError, match=r"target module 'emb' is a Embedding, which vera cannot wrap \(supported: "
                                        r"Conv1D, Linear, NF4Linear\)"):
        get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "emb"]))


BAD_CONFIGS = {
    "r": (dict(r=0), r"VeraConfig.r must be a positive integer, got 0"),
    "dropout": (dict(vera_dropout=1.5), r"VeraConfig.vera_dropout must be in \[0.0, 1.0\), got 1.5"),
    "bias": (dict(bias="lora_only"), r"VeraConfig.bias must be one of 'none', 'all', 'vera_only'; got 'lora_only'"),
    "seed": (dict(projection_prng_key="0"), r"VeraConfig.projection_prng_key must be an integer .* got '0'"),
    "d_initial": (dict(d_initial="small"), r"VeraConfig.d_initial must be a number .* got 'small'"),
    "save_projection": (dict(save_projection="yes"), r"VeraConfig.save_projection must be True or False, got 'yes'"),
    "empty targets": (dict(target_modules=[]), r"VeraConfig.target_modules is empty"),
    "layers_pattern alone": (dict(target_modules=["a"], layers_pattern="h"),
                             r"layers_to_transform. must also be specified. \(VeraConfig.layers_pattern='h'"),
}


@pytest.mark.parametrize("options,message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_values_name_the_field_the_value_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        VeraConfig(**options)


def test_bias_vera_only_trains_and_saves_the_wrapped_layers_biases(tmp_path):
    model = get_peft_model(Mixed(), VeraConfig(r=4, target_modules=["a", "b"], bias="vera_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"base_model.model.a.base_layer.bias", "base_model.model.b.base_layer.bias"} <= trainable
    assert "base_model.model.c.bias" not in trainable
    assert "base_model.model.a.base_layer.bias" in model.adapter_state_dict()


def test_gpt2_conv1d_layers_are_wrapped_as_fan_in_fan_out():
    model = get_peft_model(tiny_gpt2(), VeraConfig(r=8, target_modules=["c_attn", "c_proj"], init_weights=False))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    # c_attn 32 -> 96, attn.c_proj 32 -> 32, mlp.c_proj 128 -> 32
    assert model.base_model.vera_B["default"].shape == (96, 8) and model.base_model.vera_A["default"].shape == (8, 128)
    ids = torch.tensor([[5, 6, 7]])
    expected = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_vera_learns_a_toy_mapping():
    """Convergence: only the scaling vectors train, through frozen random projections."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), VeraConfig(r=64, target_modules=["q_proj", "v_proj", "up_proj",
                                                                          "down_proj", "lm_head"]))
    losses = train_on_toy_task(model, 60, lr=5e-2)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_vera_is_exported():
    assert lorakit.VeraConfig is VeraConfig and lorakit.get_method("vera").config_cls is VeraConfig
