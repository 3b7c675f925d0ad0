"""lorakit's rotary-embedding kernel (ops/rotary.py, ops/csrc/rotary.cpp) and the Llama attention forward that
uses it (ops/fused_modules.py): transformers' apply_rotary_pos_emb and LlamaAttention, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorakit import LoraConfig, get_peft_model
from lorakit.eval.metrics import summed_token_loss
from lorakit.ops import rotary
from lorakit.ops.fused_modules import restore_modules, use_fused_modules
from tests.tiny import tiny_llama


def _inputs(batch, heads, kv_heads, length, dim, cos_batch, dtype=torch.bfloat16, seed=0):
    """q and k as transformers makes them (transposed views of the projections' outputs), cos and sin."""
    g = torch.Generator().manual_seed(seed)
    q_proj = (torch.randn(batch, length, heads * dim, generator=g) * 3).to(dtype).requires_grad_()
    k_proj = (torch.randn(batch, length, kv_heads * dim, generator=g) * 3).to(dtype).requires_grad_()
    angles = torch.rand(cos_batch, length, dim, generator=g) * 6.3
    return q_proj, k_proj, angles.cos().to(dtype), angles.sin().to(dtype)


def _embed(apply, q_proj, k_proj, cos, sin, heads, kv_heads, seed=1):
    batch, length, _ = q_proj.shape
    q = q_proj.view(batch, length, heads, -1).transpose(1, 2)
    k = k_proj.view(batch, length, kv_heads, -1).transpose(1, 2)
    q_embed, k_embed = apply(q, k, cos, sin)
    g = torch.Generator().manual_seed(seed)
    grads = (torch.randn(q_embed.shape, generator=g).to(q_embed.dtype),
             torch.randn(k_embed.shape, generator=g).to(k_embed.dtype))
    return (q_embed, k_embed, *torch.autograd.grad((q_embed, k_embed), (q_proj, k_proj), grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, heads, kv_heads, length, dim, cos_batch",
                         [(2, 9, 3, 40, 64, 2), (1, 4, 4, 7, 10, 1), (3, 2, 1, 5, 128, 1), (1, 2, 1, 3, 44, 1)])
def test_kernel_gives_transformers_rotary_embedding_and_gradients_bit_for_bit(batch, heads, kv_heads, length, dim,
                                                                              cos_batch, dtype):
    # half widths 32, 5, 64 and 22: whole vectors, and tails of fewer and more than one fp32 vector
    q_proj, k_proj, cos, sin = _inputs(batch, heads, kv_heads, length, dim, cos_batch, dtype)
    q = q_proj.view(batch, length, heads, dim).transpose(1, 2)
    if not rotary.kernel_runs(q, q, cos, sin):
        pytest.skip("lorakit's CPU kernels cannot be built here")
    got = _embed(rotary.apply_rotary, q_proj, k_proj, cos, sin, heads, kv_heads)
    expected = _embed(apply_rotary_pos_emb, q_proj, k_proj, cos, sin, heads, kv_heads)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and torch.equal(a, b)
    assert (got[2] != 0).any() and (got[3] != 0).any()


def test_outside_the_kernel_it_is_transformers_function():
    q_proj, k_proj, cos, sin = _inputs(2, 4, 2, 6, 8, 2, dtype=torch.float64)
    q = q_proj.view(2, 6, 4, 8).transpose(1, 2)
    assert not rotary.kernel_runs(q, q, cos, sin)  # fp64
    assert not rotary.kernel_runs(q.float(), q.float(), cos.bfloat16(), sin.bfloat16())  # mixed dtypes
    got = _embed(rotary.apply_rotary, q_proj, k_proj, cos, sin, 4, 2)
    expected = _embed(apply_rotary_pos_emb, q_proj, k_proj, cos, sin, 4, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_attention_swapped_for_the_kernel_gives_the_same_loss_and_gradients(monkeypatch, dtype):
    def loss_and_grads(fused):
        model = get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B: the adapters take part in the gradients
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
        swapped = use_fused_modules(model) if fused else []
        ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(2))
        model.train()
        loss = summed_token_loss(model, {"input_ids": ids, "labels": ids})[0]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        restore_modules(model)
        return loss, grads, swapped

    loss, grads, swapped = loss_and_grads(True)
    assert sum(name.endswith("self_attn") for name in swapped) == 2  # both layers' attention
    assert torch.equal(loss, loss_and_grads(False)[0])  # every swapped forward is the module's, bit for bit
    monkeypatch.setattr(rotary, "kernel_runs", lambda *tensors: False)  # the same swap, transformers' rotary
    ref_loss, ref_grads, _ = loss_and_grads(True)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    assert sum(name.endswith("self_attn.q_proj.lora_A.default.weight") for name in grads) == 2
