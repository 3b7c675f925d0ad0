"""The fused RMSNorm and SwiGLU kernels (lorakit/ops/rms_norm.py, swiglu.py), the recomputation of cheap saved
activations (ops/recompute.py), and the module swap that puts them into a model (ops/fused_modules.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from lorakit import LoraConfig, get_peft_model
from lorakit.eval.metrics import summed_token_loss
from lorakit.ops import fused_modules
from lorakit.ops.fused_modules import restore_modules, use_fused_modules
from lorakit.ops.recompute import recompute_saved_tensors
from lorakit.ops.rms_norm import rms_norm
from lorakit.ops.swiglu import silu_mul
from tests.tiny import tiny_gpt2, tiny_llama
from lorakit.train.loop import run_training
from tests.train_fixtures import one_torch_thread  # noqa: F401  (an autouse fixture)
from tests.train_fixtures import tiny_run_config, train_losses

DTYPES = (torch.float32, torch.bfloat16)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _grads(fn, *inputs, seed=1):
    """fn's output and the gradients of a random projection of it with respect to `inputs`."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(_randn(*out.shape, dtype=out.dtype, seed=seed))
    return out.detach(), [t.grad for t in inputs]


# ---- RMSNorm -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", DTYPES)
def test_rms_norm_forward_is_the_module_bit_for_bit_and_its_gradients_agree(dtype, weight_dtype):
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(_randn(48, seed=3) + 1)
    norm.to(weight_dtype)
    x = _randn(2, 7, 48, dtype=dtype) * 3
    expected, (dx_ref, dw_ref) = _grads(lambda x, w: LlamaRMSNorm.forward(_with_weight(norm, w), x), x, norm.weight)
    got, (dx, dw) = _grads(lambda x, w: rms_norm(x, w, norm.variance_epsilon), x, norm.weight)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    # the backward computes in fp32 where autograd rounds to the input dtype on the way: equal to that rounding
    tol = 1e-5 if dtype == weight_dtype == torch.float32 else 2e-2
    assert dx.dtype == dx_ref.dtype and torch.allclose(dx.float(), dx_ref.float(), rtol=tol, atol=tol)
    assert dw.dtype == dw_ref.dtype and torch.allclose(dw.float(), dw_ref.float(), rtol=tol, atol=tol * 10)


def _with_weight(norm, weight):
    """The module with `weight` in place of its parameter (to take gradients through the class's forward)."""
    clone = LlamaRMSNorm(weight.shape[0], eps=norm.variance_epsilon)
    del clone.weight
    clone.weight = weight
    return clone


def test_rms_norm_under_autocast_is_the_module_bit_for_bit():
    norm = LlamaRMSNorm(32).to(torch.bfloat16)
    x = _randn(3, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


# ---- SwiGLU --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_the_composition_bit_for_bit_both_ways(dtype):
    gate, up = _randn(4, 5, 40, dtype=dtype, seed=1), _randn(4, 5, 40, dtype=dtype, seed=2)
    expected, expected_grads = _grads(lambda g, u: torch.nn.functional.silu(g) * u, gate, up)
    got, got_grads = _grads(silu_mul, gate, up)
    assert torch.equal(got, expected)
    for a, b in zip(got_grads, expected_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 5, 40), (3, 7, 33), (1, 70001), (2, 30000, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_silu_mul_kernel_is_pytorchs_operators_bit_for_bit(monkeypatch, dtype, shape, threads):
    """lorakit's kernel (ops/csrc/swiglu.cpp) against PyTorch's silu, mul and silu_backward: the same bits, the
    forward and both gradients, for sizes that leave a scalar tail, and split over threads as PyTorch splits them
    (sizes above its 32,768-element grain)."""
    from lorakit.ops import swiglu

    gate, up = _randn(*shape, dtype=dtype, seed=1) * 4, _randn(*shape, dtype=dtype, seed=2)
    if not swiglu.kernel_runs(gate, up):
        pytest.skip("lorakit's CPU kernels cannot be built here")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        calls = []
        kernel_runs = swiglu.kernel_runs
        monkeypatch.setattr(swiglu, "kernel_runs", lambda g, u: calls.append(1) or kernel_runs(g, u))
        got, got_grads = _grads(silu_mul, gate, up)
        assert calls
        monkeypatch.setattr(swiglu, "kernel_runs", lambda g, u: False)  # PyTorch's operators
        expected, expected_grads = _grads(silu_mul, gate, up)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, expected)
    for a, b in zip(got_grads, expected_grads):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def test_silu_mul_kernel_gives_only_the_gradients_asked_for():
    from lorakit.ops import swiglu

    gate, up = _randn(3, 64, seed=1), _randn(3, 64, seed=2)
    if not swiglu.kernel_runs(gate, up):
        pytest.skip("lorakit's CPU kernels cannot be built here")
    grad = _randn(3, 64, seed=3)
    both = torch.ops.lorakit.silu_mul_bwd(grad, gate, up, True, True)
    assert torch.ops.lorakit.silu_mul_bwd(grad, gate, up, True, False)[1] is None
    only_up = torch.ops.lorakit.silu_mul_bwd(grad, gate, up, False, True)
    assert only_up[0] is None and torch.equal(only_up[1], both[1])
    with pytest.raises(RuntimeError, match="must be a contiguous bf16 or fp32 CPU tensor"):
        torch.ops.lorakit.silu_mul(gate, up.t().contiguous().t())


# ---- recomputation -------------------------------------------------------------------------------------
def _kept_bytes(fn, parameters=()):
    """fn()'s result and the bytes autograd keeps for its backward, other than `parameters`."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    kept = {}

    def on_keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()

    with recompute_saved_tensors(on_keep=on_keep):
        out = fn()
    return out, sum(kept.values())


def test_a_registered_output_is_recomputed_not_kept_and_the_gradients_are_unchanged():
    torch.manual_seed(0)
    down = nn.Linear(64, 16)
    gate, up = _randn(8, 64, seed=1).requires_grad_(True), _randn(8, 64, seed=2).requires_grad_(True)

    def forward():
        return down(silu_mul(gate, up)).square().sum()

    plain = forward()
    plain.backward()
    expected = [t.grad.clone() for t in (gate, up, down.weight)]
    for t in (gate, up, down.weight):
        t.grad = None
    loss, kept = _kept_bytes(forward, down.parameters())
    loss.backward()
    assert torch.equal(loss, plain)
    for t, grad in zip((gate, up, down.weight), expected):
        assert torch.equal(t.grad, grad)  # the same product, recomputed bit for bit
    # kept: gate and up (silu_mul) and down's output (for square), not the product that down reads
    assert kept == 2 * 8 * 64 * 4 + 8 * 16 * 4


def test_changing_a_recipe_input_in_place_before_the_backward_is_a_clear_error():
    down = nn.Linear(16, 4)
    gate, up = _randn(3, 16, seed=1).requires_grad_(True), _randn(3, 16, seed=2).requires_grad_(True)
    with recompute_saved_tensors():
        product = silu_mul(gate * 1, up * 1)
        loss = down(product).sum()
    with torch.no_grad():
        up.add_(1)  # a leaf: not the saved tensor itself (that was up * 1), so autograd has nothing to say
    loss.backward()  # the recipe's inputs are the saved (gate * 1, up * 1): unchanged, fine
    with recompute_saved_tensors():
        g, u = gate * 1, up * 1
        loss = down(silu_mul(g, u)).sum()
    with torch.no_grad():
        u.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place|modified by an inplace"):
        loss.backward()


# ---- the module swap -----------------------------------------------------------------------------------
def test_llama_norms_and_mlps_are_swapped_and_restored_without_touching_the_random_state():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = model.get_base_model().model.config.num_hidden_layers
    state = torch.get_rng_state()
    swapped = use_fused_modules(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert len([n for n in swapped if n.endswith("mlp")]) == layers
    assert len([n for n in swapped if n.endswith("norm")]) == 2 * layers + 1
    assert use_fused_modules(model) == []  # once only
    assert restore_modules(model) == len(swapped)
    assert not any("forward" in vars(m) for m in model.modules())


def test_modules_that_compute_something_else_keep_their_own_forward():
    class OffsetNorm(LlamaRMSNorm):  # Gemma's form: (1 + weight)
        def forward(self, x):
            return super().forward(x) + x.new_tensor(0.5)

    class GeluMLP(LlamaMLP):
        def __init__(self, config):
            super().__init__(config)
            self.act_fn = nn.GELU()

    model = tiny_llama()
    config = model.config
    model.model.norm = OffsetNorm(config.hidden_size)
    model.model.layers[0].mlp = GeluMLP(config)
    swapped = use_fused_modules(model)
    assert "model.norm" not in swapped and "model.layers.0.mlp" not in swapped
    assert "model.layers.1.mlp" in swapped
    assert use_fused_modules(tiny_gpt2()) == []  # LayerNorm and a GELU MLP: nothing to swap



def _greedy(model, ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


def test_a_swapped_llama_attention_decodes_through_the_kv_cache_as_its_own_forward():
    model = tiny_llama()
    ids = torch.randint(5, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    expected_tokens, expected_scores = _greedy(model, ids)
    swapped = use_fused_modules(model)
    assert len([n for n in swapped if n.endswith("self_attn")]) == model.config.num_hidden_layers
    tokens, scores = _greedy(model, ids)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(scores, expected_scores)  # every decoded token's logits, bit for bit


def test_an_attention_forward_that_misses_the_kv_cache_fails_the_probe(monkeypatch):
    def without_cache(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)  # decodes from an empty cache
        return fused_modules._fused_attention_forward(self, hidden_states, position_embeddings, attention_mask,
                                                      **kwargs)

    candidates = tuple((matches, without_cache if fused is fused_modules._fused_attention_forward else fused, *rest)
                       for matches, fused, *rest in fused_modules.CANDIDATES)
    monkeypatch.setattr(fused_modules, "CANDIDATES", candidates)
    swapped = use_fused_modules(tiny_llama())
    assert not any(n.endswith("self_attn") for n in swapped)
    assert any(n.endswith("mlp") for n in swapped)  # the other candidates are still swapped

@pytest.mark.parametrize("bf16", [False, True])
def test_a_swapped_model_gives_the_same_loss_and_nearly_the_same_gradients(bf16):
    def loss_and_grads(fused: bool):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights=False)).train()
        if fused:
            use_fused_modules(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, kept = _kept_bytes(lambda: summed_token_loss(model, batch)[0], model.parameters())
        loss.backward()
        return loss.detach(), kept, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model.config

    ref_loss, ref_kept, ref_grads, config = loss_and_grads(False)
    loss, kept, grads, _ = loss_and_grads(True)
    assert torch.equal(loss, ref_loss)  # the forward is the modules' own, operation for operation
    # at least silu(gate) and the product that down_proj reads, per layer, are no longer kept (24 tokens)
    per_layer = 2 * 24 * config.intermediate_size * (2 if bf16 else 4)
    assert ref_kept - kept >= config.num_hidden_layers * per_layer
    tol = 3e-2 if bf16 else 1e-5
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=tol, atol=tol * grad.abs().max().item()), name


def test_training_with_and_without_fused_modules_follows_the_same_losses(tmp_path):
    fused = run_training(tiny_run_config(tmp_path, output="fused"), show_progress=False)
    plain = run_training(tiny_run_config(tmp_path, "train.fused_modules=false", output="plain"), show_progress=False)
    a, b = train_losses(fused.output_dir), train_losses(plain.output_dir)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert not any("forward" in vars(m) for m in fused.model.modules())  # handed back with its own forwards


# ---- lorakit's CPU kernel for RMSNorm (ops/csrc/rms_norm.cpp) --------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 576), (37, 576), (5, 50), (3, 7)])
def test_rms_norm_backward_kernel_gives_the_operators_gradients_to_rounding(monkeypatch, rows, width, dtype):
    from lorakit.ops import rms_norm as module

    x = (_randn(2, rows, width, seed=4) * 3).to(dtype)
    weight = (_randn(width, seed=5) + 1).to(dtype)
    if not module.kernel_runs(x, weight):
        pytest.skip("lorakit's RMSNorm kernel cannot be built here")
    got, (dx, dw) = _grads(lambda x, w: rms_norm(x, w, 1e-5), x, weight)
    monkeypatch.setattr(module, "kernel_runs", lambda *tensors: False)  # PyTorch's operators
    expected, (dx_ref, dw_ref) = _grads(lambda x, w: rms_norm(x, w, 1e-5), x, weight)
    assert torch.equal(got, expected)
    assert dx.dtype == dx_ref.dtype == dtype and dw.dtype == dw_ref.dtype == dtype
    # the same fp32 math in another order of additions: at most one bf16 rounding step apart; in fp32, fp32 rounding
    rtol, atol_x, atol_w = (2 ** -7, 1e-6, 1e-4) if dtype == torch.bfloat16 else (1e-5, 1e-6, 1e-5)
    assert torch.allclose(dx.float(), dx_ref.float(), rtol=rtol, atol=atol_x)
    assert torch.allclose(dw.float(), dw_ref.float(), rtol=rtol, atol=atol_w)
    assert (dx != 0).any() and (dw != 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 576), (37, 576), (5, 50), (3, 7)])
def test_rms_norm_kernel_normalises_as_the_module_does_bit_for_bit(rows, width, dtype):
    from lorakit.ops import rms_norm as module

    x = (_randn(2, rows, width, seed=6) * 3).to(dtype)
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = _randn(width, seed=7) + 1
    norm = norm.to(dtype)
    if not module.kernel_runs(x, norm.weight):
        pytest.skip("lorakit's RMSNorm kernel cannot be built here")
    with torch.no_grad():
        expected = norm(x)
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert torch.equal(torch.ops.lorakit.rms_norm_apply(x, rstd, norm.weight), expected)
        assert torch.equal(rms_norm(x, norm.weight, 1e-5), expected)
