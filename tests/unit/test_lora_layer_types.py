"""LoRA on convolutions (Conv1d/2d/3d, grouped) and nn.MultiheadAttention: shapes, outputs, what is refused and why.
Merging, saving and mixed batches of every layer type run in tests/conformance; agreement with PEFT in
tests/interop/test_layer_types.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.adapter_layer import UnsupportedLayerError
from lorakit.methods.lora.conv import LoraConv
from lorakit.methods.lora.layer import LoraLinear
from lorakit.methods.lora.mha import LoraMultiheadAttention
from lorakit.train.strategies.adapters import (
    adapter_layers,
    base_weight_names,
    check_dense_base,
)
from tests.tiny import randomize_trainable

pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")


def one_layer(layer: nn.Module, **config):
    """A PeftModel around one layer (module name "0"), random adapter."""
    model = get_peft_model(nn.Sequential(layer), LoraConfig(target_modules=["0"], **{"r": 4, **config}))
    randomize_trainable(model)
    return model.eval()


# ---- convolutions -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv,a_shape,b_shape", [
    (nn.Conv1d(6, 8, 3), (4, 6, 3), (8, 4, 1)),
    (nn.Conv2d(6, 8, (3, 2)), (4, 6, 3, 2), (8, 4, 1, 1)),
    (nn.Conv3d(6, 8, 2), (4, 6, 2, 2, 2), (8, 4, 1, 1, 1)),
    (nn.Conv2d(6, 8, 3, groups=2), (4, 6, 3, 3), (8, 2, 1, 1)),  # A sees all input channels, B is grouped
    (nn.Conv1d(8, 8, 3, groups=4), (4, 8, 3), (8, 1, 1)),
])
def test_conv_tensors_have_peft_shapes(conv, a_shape, b_shape):
    model = one_layer(conv)
    layer = model.get_base_model()[0]
    assert isinstance(layer, LoraConv)
    assert tuple(layer.lora_A["default"].weight.shape) == a_shape
    assert tuple(layer.lora_B["default"].weight.shape) == b_shape
    assert set(model.adapter_state_dict()) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}


@pytest.mark.parametrize("conv,x_shape", [
    (nn.Conv1d(6, 8, 3, stride=2, padding=1), (2, 6, 11)),
    (nn.Conv3d(6, 8, 2, padding=1), (2, 6, 4, 3, 5)),
    (nn.Conv2d(6, 8, 3, padding=1, groups=2), (2, 6, 5, 5)),
])
def test_conv_output_is_base_plus_scaled_b_of_a(conv, x_shape):
    """h = conv(x; W0) + s * B(A(x)), with B a grouped 1x1 convolution."""
    model = one_layer(conv, lora_alpha=8)
    layer = model.get_base_model()[0]
    x = torch.randn(x_shape)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
    lora = conv_fn(conv_fn(x, a, stride=conv.stride, padding=conv.padding), b, groups=conv.groups)
    torch.testing.assert_close(model(x), conv(x) + 2.0 * lora)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Conv1d(3, 4, 3, padding=1,
                                                                                     padding_mode="reflect")])
def test_dilated_and_reflect_padded_convs_merge_to_the_same_output(conv):
    """A keeps the base's dilation and padding mode (PEFT's drops them): the unmerged and merged outputs agree."""
    model = one_layer(conv)
    x = torch.randn((2, 3, 7, 7) if isinstance(conv, nn.Conv2d) else (2, 3, 9))
    unmerged = model(x)
    torch.testing.assert_close(model.merge_and_unload()(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config,source", [(dict(r=3), "LoraConfig.r=3"),
                                           (dict(r=4, rank_pattern={"0": 6}), r"LoraConfig.rank_pattern \(r=6")])
def test_grouped_conv_rank_must_be_a_multiple_of_groups(config, source):
    model = nn.Sequential(nn.Conv2d(16, 32, 3, groups=4))
    with pytest.raises(ValueError, match=rf"{source}.* cannot adapt 0: Targeting a Conv2d with groups=4 and rank \d. "
                                         "Currently, support is limited to conv layers where the rank is divisible "
                                         "by groups.*a multiple of 4"):
        get_peft_model(model, LoraConfig(target_modules=["0"], **config))
    assert type(model[0]) is nn.Conv2d


def test_grouped_conv_warns_and_refuses_merges_and_combinations():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv1d(8, 8, 1))
    with pytest.warns(UserWarning, match=r"groups > 1. Merging is not supported. \(0: Conv2d with groups=2\)"):
        peft_model = get_peft_model(model, LoraConfig(target_modules=["0", "1"], r=4, init_lora_weights=False))
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(NotImplementedError, match=r"^0: LoRA on a grouped Conv2d \(groups=2\) cannot be merged.*"
                                                  r"Nothing was merged"):
        peft_model.merge_adapter()
    with pytest.raises(NotImplementedError, match="grouped Conv2d"):
        peft_model.merge_and_unload()
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())  # the Conv1d was not merged
    assert not any(getattr(m, "merged_adapters", None) for m in peft_model.modules())
    with pytest.raises(ValueError, match="add_weighted_adapter: 0: LoRA on a grouped Conv2d"):
        peft_model.add_weighted_adapter(["default"], [0.5], "scaled", combination_type="cat")
    assert "scaled" not in peft_model.peft_config


def test_grouped_conv_dora_norm_is_peft_s():
    """PEFT's DoRA norm on a grouped kernel: (B viewed (out/g, r)) @ A (r, in*K), reshaped into W0's shape."""
    model = one_layer(nn.Conv2d(6, 8, 3, groups=2), use_dora=True)
    layer = model.get_base_model()[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    peft_update = (b.reshape(-1, 4) @ a.reshape(4, -1)).reshape(layer.base_layer.weight.shape)
    expected = (layer.base_layer.weight + layer.scaling["default"] * peft_update).flatten(1).norm(dim=1)
    scale = layer.lora_variant["default"].scale(layer, "default")
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].flatten() / scale.flatten(), expected)


def test_grouped_conv_dora_starts_at_the_weight_norm():
    model = get_peft_model(nn.Sequential(nn.Conv1d(4, 6, 3, groups=2)), LoraConfig(target_modules=["0"], r=2,
                                                                                   use_dora=True))
    layer = model.get_base_model()[0]
    assert layer.lora_magnitude_vector["default"].shape == (1, 6, 1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].flatten(),
                               layer.base_layer.weight.flatten(1).norm(dim=1))
    x = torch.randn(2, 4, 7)
    torch.testing.assert_close(model(x), layer.base_layer(x))


@pytest.mark.parametrize("layer", [nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 2), nn.MultiheadAttention(8, 2)])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_are_refused_on_convs_and_attention(layer, init):
    model = nn.Sequential(layer)
    with pytest.raises(UnsupportedLayerError, match=rf"init_lora_weights='{init}' cannot initialise 0, a "
                                                    rf"{type(layer).__name__}; this layer type takes True, 'gaussian', "
                                                    "False"):
        get_peft_model(model, LoraConfig(target_modules=["0"], init_lora_weights=init))
    assert type(model[0]) is type(layer)


# ---- nn.MultiheadAttention ----------------------------------------------------------------------------------

class Attention(nn.Module):
    """Batch-first input (so adapter_names matches its rows) into an nn.MultiheadAttention of either layout."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        q = x if self.mha.batch_first else x.transpose(0, 1)
        out, weights = self.mha(q, q, q, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return (out if self.mha.batch_first else out.transpose(0, 1)), weights


def attention_model(batch_first=False, **config):
    model = get_peft_model(Attention(batch_first), LoraConfig(target_modules=["mha"], **{"r": 4, **config}))
    randomize_trainable(model)
    return model.eval()


def test_mha_adapts_in_proj_and_out_proj_with_peft_names():
    model = attention_model()
    mha = model.get_base_model().mha
    assert isinstance(mha, LoraMultiheadAttention) and isinstance(mha.base_layer.out_proj, LoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.mha.{p}.default.weight" for p in
                         ("lora_A", "lora_B", "base_layer.out_proj.lora_A", "base_layer.out_proj.lora_B")}
    assert mha.lora_B["default"].weight.shape == (24, 4)
    x = torch.randn(3, 5, 8)
    w_in = mha.base_layer.in_proj_weight + mha.delta_weight("default")
    out_proj = mha.base_layer.out_proj
    w_out = out_proj.base_layer.weight + out_proj.delta_weight("default")
    q = x.transpose(0, 1)
    expected = F.multi_head_attention_forward(q, q, q, 8, 2, w_in, mha.base_layer.in_proj_bias, None, None, False, 0.0,
                                              w_out, out_proj.base_layer.bias, training=False)[0]
    torch.testing.assert_close(model(x)[0], expected.transpose(0, 1))


def test_mha_forward_leaves_base_parameters_alone_and_trains_both_projections():
    model = attention_model()
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model(torch.randn(3, 5, 8))[0].square().sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
        if not param.requires_grad:
            assert torch.equal(param, base[name]), name  # nothing merged into the base during the forward
    assert isinstance(model.get_base_model().mha.base_layer.in_proj_weight, nn.Parameter)


def test_mha_adapter_acts_under_fsdp_with_original_parameters():
    """FSDP(use_orig_params=True) shows parameters as plain tensor attributes during a no-grad forward; the adapter
    must still change the output (equal to the unwrapped model's)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = attention_model(batch_first=True)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = model(x)[0]
        with model.disable_adapter():
            base = model(x)[0]
    assert not torch.allclose(expected, base)
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP's deprecation notice
            wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x)[0], expected)
    finally:
        dist.destroy_process_group()


def test_mha_attributes_read_through():
    model = attention_model(batch_first=True)
    mha = model.get_base_model().mha
    base = mha.base_layer
    assert (mha.embed_dim, mha.num_heads, mha.batch_first, mha.head_dim) == (8, 2, True, 4)
    assert mha.in_proj_weight is base.in_proj_weight and mha.in_proj_bias is base.in_proj_bias
    assert not hasattr(mha, "weight") and mha.bias is None
    with pytest.raises(AttributeError):
        _ = mha.no_such_attribute


def test_mha_in_a_transformer_encoder_layer_is_not_skipped_by_torch_s_fast_path():
    """In eval mode a batch-first TransformerEncoderLayer may compute attention from self_attn.in_proj_weight
    directly (torch's fused path), never calling self_attn; the adapter must act there too."""
    encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 16)
    base = encoder.eval()(x)
    model = get_peft_model(encoder, LoraConfig(target_modules=["self_attn"], init_lora_weights=False))
    model.train()
    trained_mode = model(x)  # the training path never takes the fused kernel
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            disabled = model(x)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(adapted, trained_mode)
    torch.testing.assert_close(disabled, base)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_mixed_batch_with_masks_equals_per_row_runs(batch_first):
    model = attention_model(batch_first=batch_first)
    model.add_adapter("b", LoraConfig(target_modules=["mha"], r=2, init_lora_weights=False))
    x = torch.randn(4, 5, 8)
    padding = torch.zeros(4, 5)
    padding[1, 3:] = float("-inf")  # keys 3.. of row 1 are padding
    attn_mask = torch.randn(4 * 2, 5, 5)  # (batch * heads, L, S)
    names = ["default", "b", "__base__", "b"]
    out, weights = model(x, padding, attn_mask, adapter_names=names)
    for row, name in enumerate(names):
        args = (x[row:row + 1], padding[row:row + 1], attn_mask[2 * row:2 * row + 2])
        if name == "__base__":
            with model.disable_adapter():
                alone, alone_weights = model(*args)
        else:
            model.set_adapter(name)
            alone, alone_weights = model(*args)
        torch.testing.assert_close(out[row:row + 1], alone)
        torch.testing.assert_close(weights[row:row + 1], alone_weights)


def test_mha_mixed_batch_needs_batched_input():
    model = attention_model()
    mha = model.get_base_model().mha
    with pytest.raises(ValueError, match="need batched inputs.*unbatched query of shape \\(5, 8\\)"):
        with model._mixed_batch(["default"], (), {}):
            mha(torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8))


def test_mha_lora_dropout_is_not_applied_as_in_peft():
    model = attention_model(lora_dropout=0.5)
    model.train()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(model(x)[0], model(x)[0])


def test_mha_refusals_use_peft_s_wording_and_leave_the_model_untouched():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=4))
    with pytest.raises(ValueError, match="Only same embed for query/key/value is supported as of now for "
                                         "MultiheadAttention"):
        get_peft_model(model, LoraConfig(target_modules=["0"]))
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"use_dora=True: DoRA cannot run on 0, a MultiheadAttention"):
        get_peft_model(model, LoraConfig(target_modules=["0"], use_dora=True))
    assert type(model[0]) is nn.MultiheadAttention and type(model[0].out_proj) is not LoraLinear


def test_mha_unwraps_to_plain_modules():
    model = attention_model()
    model.add_adapter("b", LoraConfig(target_modules=["mha"], r=2))
    model.delete_adapter("b")
    x = torch.randn(2, 5, 8)
    expected = model(x)[0]
    plain = model.merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention
    assert type(plain.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(plain(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_mha_after_all_linear_reuses_the_out_proj_layer():
    """"all-linear" wraps an nn.MultiheadAttention's out_proj (a Linear; as in PEFT), where LoRA has no effect (the
    attention never calls it); a later adapter on the whole attention module takes that layer over and acts."""
    model = get_peft_model(Attention(False), LoraConfig(target_modules="all-linear", init_lora_weights=False), "a")
    x = torch.randn(2, 5, 8)
    base_out = model(x)[0]
    model.add_adapter("b", LoraConfig(target_modules=["mha"], init_lora_weights=False))
    out_proj = model.get_base_model().mha.base_layer.out_proj
    assert isinstance(out_proj, LoraLinear) and set(out_proj.adapter_names) == {"a", "b"}
    torch.testing.assert_close(model(x)[0], base_out)  # "a" on out_proj alone is never called: no effect
    model.set_adapter("b")
    assert (model(x)[0] - base_out).abs().max() > 1e-3


def test_mha_with_bias_lora_only_trains_out_proj_bias_as_peft():
    model = get_peft_model(Attention(False), LoraConfig(target_modules=["mha"], bias="lora_only"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {"base_model.model.mha.base_layer.out_proj.base_layer.bias"}


def test_no_warning_for_ungrouped_convs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_layer(nn.Conv2d(4, 4, 3))


def test_strategies_that_write_the_base_find_attention_s_weight_and_refuse_grouped_convs():
    """ReLoRA and Delta-LoRA write the weight adapters change: in_proj_weight for attention (its out_proj is a
    layer of its own); a grouped convolution's update fits no base weight."""
    model = attention_model()
    layers = adapter_layers(model)
    check_dense_base(layers, "ReLoRA")
    assert base_weight_names(model, layers) == ["base_model.model.mha.base_layer.in_proj_weight",
                                                "base_model.model.mha.base_layer.out_proj.base_layer.weight"]
    grouped = one_layer(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="Delta-LoRA changes the base weights by the adapter's update, but 0: LoRA "
                                         "on a grouped Conv2d"):
        check_dense_base(adapter_layers(grouped), "Delta-LoRA")
