"""LoRA's variants inside the LoRA method: DoRA, PiSSA / OLoRA (and their conversion to plain LoRA), LoRA-FA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.methods.lora import dora
from lorakit.methods.lora.dora import dense_row_norms, row_norms
from lorakit.methods.lora.layer import LoraLayer, LoraLinear
from lorakit.methods.lora.tuner import LoraTuner
from tests.tiny import randomize_trainable, tiny_llama


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 12)
        self.lin = nn.Linear(12, 10)
        self.fused = Conv1D(14, 10)  # weight (10, 14), stored transposed
        nn.init.normal_(self.fused.weight, std=0.3)
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.tall = nn.Linear(3, 20)  # rank at most 3

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        h = self.fused(h)  # (B, T, 14)
        c = self.conv(h.unsqueeze(1)).mean(1)  # (B, T, 14)
        return self.tall(c[..., :3]).sum(-1) + c.sum(-1)


IDS = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(1))


def layers(model) -> dict[str, LoraLayer]:
    return {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# ---- DoRA ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,r,scaling", [((10, 12), 4, 2.0), ((64, 16), 8, 0.5), ((5, 40), 2, 16.0)])
def test_factored_row_norm_equals_the_dense_one(shape, r, scaling):
    gen = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(shape, generator=gen), torch.randn(r, shape[1], generator=gen), torch.randn(shape[0], r,
                                                                                                        generator=gen)
    torch.testing.assert_close(row_norms(w, a, b, scaling), dense_row_norms(w, a, b, scaling), rtol=1e-5, atol=1e-5)
    # float64 shows the identity is exact, not an approximation
    w, a, b = w.double(), a.double(), b.double()
    torch.testing.assert_close(row_norms(w, a, b, scaling).double(), dense_row_norms(w, a, b, scaling),
                               rtol=1e-6, atol=0)


def test_dora_magnitude_is_the_row_norm_of_w_per_layer_type():
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["emb", "lin", "fused", "conv"], use_dora=True))
    found = layers(model)
    base = Toy()
    m = {k: layer.lora_magnitude_vector["default"] for k, layer in found.items()}
    torch.testing.assert_close(m["lin"], base.lin.weight.norm(dim=1))  # over d_in, one per output row
    torch.testing.assert_close(m["fused"], base.fused.weight.norm(dim=0))  # Conv1D stores (d_in, d_out)
    torch.testing.assert_close(m["emb"], base.emb.weight.norm(dim=0))  # per embedding dimension, over the vocabulary
    assert m["conv"].shape == (1, 4, 1, 1)  # PEFT's shape for convolutions
    torch.testing.assert_close(m["conv"].flatten(), base.conv.weight.flatten(1).norm(dim=1))
    assert all(p.requires_grad for p in m.values())


def test_dora_output_is_the_decomposed_weight_and_the_norm_gets_no_gradient():
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    randomize_trainable(model)
    layer = layers(model)["lin"]
    x = torch.randn(4, 12)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    m = layer.lora_magnitude_vector["default"]
    w = layer.base_layer.weight
    direction = w + s * b @ a
    expected = x @ (m[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()).T + layer.base_layer.bias
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # gradients equal those of the formula with the norm treated as a constant (paper Sec. 4.3)
    grads = torch.autograd.grad(out.square().sum(), [a, b, m])
    expected_grads = torch.autograd.grad(expected.square().sum(), [a, b, m])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", ["lin", "fused"])  # nn.Linear and GPT-2's Conv1D
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_dora_adapter_runs_on_the_fused_function_as_the_general_path_computes_it(target, dtype, monkeypatch):
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=[target], use_dora=True))
    randomize_trainable(model)
    layer = layers(model)[target]
    layer.base_layer.to(dtype)
    layer.base_layer.bias.requires_grad_(True)  # a trained bias (bias="all"): added after the scaling
    x = torch.randn(4, 12 if target == "lin" else 10, dtype=dtype, requires_grad=True)
    trained = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"],
               layer.base_layer.bias, x]
    fused = layer(x)
    grads = torch.autograd.grad(fused.float().square().sum(), trained)
    with torch.no_grad():  # inference: without the autograd function (bf16 rows: the adapter's fp32 factors)
        inference = layer(x)
    if dtype == torch.float32:
        assert torch.equal(inference, fused.detach())
    else:
        torch.testing.assert_close(inference.float(), fused.detach().float(), atol=2e-2, rtol=2e-2)
    general_calls = []
    original = LoraLayer.forward
    monkeypatch.setattr(LoraLinear, "_fused_dora_forward",
                        lambda self, x, name: general_calls.append(1) or original(self, x))
    general = layer(x)
    assert general_calls  # the second forward took the general path, so the first one did not
    general_grads = torch.autograd.grad(general.float().square().sum(), trained)
    assert fused.dtype == general.dtype == dtype
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused.float(), general.float(), **tolerance)
    for got, want in zip(grads, general_grads):
        torch.testing.assert_close(got, want, **{k: v * 10 for k, v in tolerance.items()})


def test_dora_with_dropout_recomputes_the_base_term_on_the_dropped_input():
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], use_dora=True, lora_dropout=0.5))
    randomize_trainable(model)
    layer = layers(model)["lin"].train()
    x = torch.randn(4, 12)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["default"](x)
    scale = layer.lora_variant["default"].scale(layer, "default")
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    lora = layer.lora_output("default", dropped)
    expected = x @ w.T + bias + (scale - 1) * (dropped @ w.T) + scale * lora  # PEFT's formula
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dora_merge_unmerge_restores_the_weight_for_every_layer_type():
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["emb", "lin", "fused", "conv"], use_dora=True))
    randomize_trainable(model)
    before = {k: layer.base_layer.weight.clone() for k, layer in layers(model).items()}
    expected = model(IDS)
    model.merge_adapter()
    torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for key, layer in layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, before[key], atol=1e-6, rtol=0)


def _fresh_scale(layer, name="default"):
    """DoRA's m / ||W + s B A|| computed from scratch (no cached base norms)."""
    base = layer.to_matrix(layer.dense_base_weight())
    norm = row_norms(base, *layer.norm_factors(name), layer.scaling[name])
    magnitude = layer.lora_magnitude_vector[name]
    return magnitude / norm.view(magnitude.shape)


def test_dora_reuses_the_base_norms_only_while_the_base_weight_is_unchanged(monkeypatch):
    """||W0||^2 per row is computed once per frozen base weight; every way the weight can change makes the next scale
    compute it again: an in-place write (merge/unmerge, load_state_dict, any no-grad op), a new tensor, a new dtype."""
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin", "fused", "conv"], use_dora=True))
    randomize_trainable(model)
    calls = []
    real = dora.weight_row_norms_sq
    monkeypatch.setattr(dora, "weight_row_norms_sq", lambda weight: calls.append(weight.shape) or real(weight))
    lin = layers(model)["lin"]
    variant = lin.lora_variant["default"]
    variant.scale(lin, "default")
    variant.scale(lin, "default")
    assert len(calls) == 1  # reused
    for change in (lambda w: w.mul_(1.5),  # in place (the version counter)
                   lambda w: setattr(lin.base_layer, "weight", nn.Parameter(w * 2, requires_grad=False)),
                   lambda w: setattr(lin.base_layer.weight, "data", w.double().float() + 1)):
        before = len(calls)
        with torch.no_grad():
            change(lin.base_layer.weight)
        torch.testing.assert_close(variant.scale(lin, "default"), _fresh_scale(lin), rtol=0, atol=0)
        assert len(calls) == before + 2  # the scale's and _fresh_scale's: nothing stale was reused
    expected = model(IDS)
    model.merge_adapter()
    model.unmerge_adapter()  # writes W0 back through write_base_weight, to within fp32 rounding
    for layer in layers(model).values():
        torch.testing.assert_close(layer.lora_variant["default"].scale(layer, "default"), _fresh_scale(layer),
                                   rtol=0, atol=0)
    torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=1e-5)
    model.load_state_dict({k: v * 0.5 if k.endswith("lin.base_layer.weight") else v
                           for k, v in model.state_dict().items()})
    torch.testing.assert_close(variant.scale(lin, "default"), _fresh_scale(lin), rtol=0, atol=0)


def test_a_dora_run_with_the_cached_base_norms_is_the_uncached_run_bit_for_bit(monkeypatch):
    def train(cached: bool):
        if not cached:
            monkeypatch.setattr(dora.DoraVariant, "_weight_norms_sq",
                                lambda self, base, weight: dora.weight_row_norms_sq(weight))
        model = get_peft_model(tiny_llama(seed=2), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               use_dora=True))
        randomize_trainable(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        monkeypatch.undo()
        return losses, {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    (losses, state), (ref_losses, ref_state) = train(True), train(False)
    assert losses == ref_losses
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


class Unsupported(nn.Module):
    """A layer LoRA could wrap but DoRA cannot (a stand-in for a future layer type)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight.T


class LoraWithoutDora(LoraLinear):
    variants = ()

    def __init__(self, base_layer) -> None:
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out, self.in_features, self.out_features = False, 4, 4
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()


def test_dora_on_a_layer_type_it_cannot_handle_names_module_and_type(monkeypatch):
    monkeypatch.setitem(LoraTuner.layers, Unsupported, LoraWithoutDora)
    model = nn.Sequential()
    model.add_module("special", Unsupported())
    get_peft_model(model, LoraConfig(r=2, target_modules=["special"]))  # plain LoRA works
    model = nn.Sequential()
    model.add_module("special", Unsupported())
    with pytest.raises(TypeError, match=r"use_dora=True: DoRA cannot run on special, a Unsupported"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["special"], use_dora=True))


# ---- PiSSA / OLoRA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_inits_keep_the_output_and_move_the_principal_part(init):
    base = Toy()
    model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "fused"], init_lora_weights=init))
    torch.testing.assert_close(model(IDS), base(IDS), atol=1e-5, rtol=1e-5)
    for key, layer in layers(model).items():
        w0 = layer.to_matrix(getattr(base, key).weight)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        residual = layer.to_matrix(layer.base_layer.weight)
        torch.testing.assert_close(residual + layer.scaling["default"] * b @ a, w0, atol=1e-5, rtol=0)
        if init.startswith("pissa"):  # s B A is the best rank-r approximation: the residual's top singular value
            s = torch.linalg.svdvals(w0)  # is W0's (r+1)-th (the randomized SVD is close to it)
            tol = 1e-4 if init == "pissa" else 2e-2
            torch.testing.assert_close(torch.linalg.svdvals(residual)[0], s[2], atol=tol, rtol=tol)
            torch.testing.assert_close(torch.linalg.svdvals(layer.scaling["default"] * b @ a)[:2], s[:2],
                                       atol=tol, rtol=tol)


def test_pissa_r_above_the_rank_is_refused_and_leaves_the_model_as_it_was():
    before = {k: v.clone() for k, v in Toy().state_dict().items()}
    model = Toy()
    with pytest.raises(ValueError, match=r"r=4 is above the rank of tall's weight \(\(20, 3\), rank at most 3\)"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["lin", "tall"], init_lora_weights="pissa"))
    # lin was initialised (its base rewritten) before tall failed: the base is W0 again, no adapter layer left
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_pissa_r_above_the_numerical_rank_is_refused():
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 2) @ torch.randn(2, 8))  # rank 2
    with pytest.raises(ValueError, match=r"r=3 is above the numerical rank of 0's weight \(2 singular values"):
        get_peft_model(model, LoraConfig(r=3, target_modules=["0"], init_lora_weights="pissa"))


@pytest.mark.parametrize("target", ["emb", "conv"])
def test_residual_inits_refuse_embeddings_and_convolutions(target):
    with pytest.raises(TypeError, match=rf"init_lora_weights='olora' cannot initialise {target}"):
        get_peft_model(Toy(), LoraConfig(r=2, target_modules=[target], init_lora_weights="olora"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora_reproduces_the_trained_model_on_the_original_base(init, tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "fused", "emb"], init_lora_weights=init,
                        bias="lora_only")
    with pytest.raises(TypeError):  # the embedding cannot take PiSSA/OLoRA
        get_peft_model(Toy(), config)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "fused"], init_lora_weights=init, bias="lora_only")
    model = get_peft_model(Toy(), config)
    model.save_pretrained(str(tmp_path / "init"))
    randomize_trainable(model, seed=5)  # "training", biases included
    trained = model(IDS)
    model.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    converted = lorakit.LoraConfig.from_pretrained(str(tmp_path / "lora"))
    assert (converted.r, converted.lora_alpha, converted.init_lora_weights) == (4, 8, True)
    plain = lorakit.PeftModel.from_pretrained(Toy(), str(tmp_path / "lora"))  # the original base, not the residual
    torch.testing.assert_close(plain(IDS), trained, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, Toy()(IDS), atol=1e-3)


def test_conversion_refusals(tmp_path):
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "init"))
    with pytest.raises(ValueError, match="leaves the base weight as it is"):
        model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    other = get_peft_model(Toy(), LoraConfig(r=3, target_modules=["lin"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="is not this adapter right after its initialisation"):
        other.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    dora = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights="pissa", use_dora=True))
    with pytest.raises(ValueError, match="cannot convert a DoRA adapter"):
        dora.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out").exists()


def test_plain_lora_from_zero_converts_to_itself_at_twice_the_rank(tmp_path):
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], use_rslora=True))
    model.save_pretrained(str(tmp_path / "init"))
    randomize_trainable(model)
    expected = model(IDS)
    model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    loaded = lorakit.PeftModel.from_pretrained(Toy(), str(tmp_path / "out"))
    assert loaded.peft_config["default"].r == 4
    torch.testing.assert_close(loaded(IDS), expected, atol=1e-5, rtol=1e-5)


# ---- LoRA-FA ---------------------------------------------------------------------------------------------

def saved_activation_shapes(layer: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for the backward of `layer(x)`, parameters left out."""
    params = {p.data_ptr() for p in layer.parameters()}
    shapes = []

    def pack(tensor):
        if tensor.data_ptr() not in params:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return shapes


def test_lora_fa_freezes_a_and_keeps_only_r_columns_for_the_backward():
    d_in, r, tokens = 64, 4, 10
    model = get_peft_model(nn.Sequential(nn.Linear(d_in, 48)), LoraConfig(r=r, target_modules=["0"]))
    layer = model.get_base_model()[0]
    x = torch.randn(tokens, d_in, requires_grad=True)
    assert (tokens, d_in) in saved_activation_shapes(layer, x)  # plain LoRA keeps x for A's gradient
    lorakit.enable_lora_fa(model)
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    assert saved_activation_shapes(layer, x) == [(tokens, r)]  # LoRA-FA keeps A x only
    model.set_adapter("default")  # trainability is re-applied: A stays frozen
    assert not layer.lora_A["default"].weight.requires_grad


def test_lora_fa_halves_the_trainable_parameters_and_leaves_embeddings_trainable():
    targets = ["q_proj", "v_proj", "embed_tokens"]
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    fa = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    lorakit.enable_lora_fa(fa)
    trainable = {n for n, p in fa.named_parameters() if p.requires_grad}
    assert not any(".lora_A." in n for n in trainable)
    assert any("lora_embedding_A" in n for n in trainable)  # zero-initialised: frozen it would stay zero
    a_sizes = sum(p.numel() for n, p in plain.named_parameters() if ".lora_A." in n)
    assert fa.get_nb_trainable_parameters()[0] == plain.get_nb_trainable_parameters()[0] - a_sizes


def test_enable_lora_fa_refuses_unknown_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter 'nope' is not a LoRA adapter"):
        lorakit.enable_lora_fa(model, ["nope"])
