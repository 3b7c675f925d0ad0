"""Adapter arithmetic (PeftModel.add_weighted_adapter): the merge rules, each combination type, bad input."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.methods.lora.arithmetic import (
    COMBINATION_TYPES,
    dare_linear,
    disjoint_merge,
    magnitude_pruned,
    majority_sign_mask,
    randomly_pruned,
    ties,
)
from lorakit.methods.lora.layer import LoraLayer
from tests.tiny import tiny_llama

IDS = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(0))


def two_adapters(r_b=4, **b_options):
    """Adapters "a" (q_proj, v_proj) and "b" (q_proj, o_proj), random."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=r_b, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                      init_lora_weights=False, **b_options))
    return model


def lora_layers(model):
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def update(layer, name):
    """s B A in matrix layout (0 where the adapter is absent)."""
    if not layer.has_adapter(name):
        return 0
    a, b = layer.matrix_factors(name)
    return layer.scaling[name] * b @ a


# ---- the rules -----------------------------------------------------------------------------------------

def test_ties_by_hand():
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-2.0, -4.0, 1.0, 0.1])
    # density 0.5 keeps the two largest of each: t1 -> [3, 0, 0, 2], t2 -> [-2, -4, 0, 0]
    assert torch.equal(magnitude_pruned(t1, 0.5), torch.tensor([3.0, 0, 0, 2.0]))
    # elected signs (sum): [+1, -1, +1 (tie at 0 -> +), +1]; kept: [t1, t2, none, t1]
    weights = torch.tensor([1.0, 0.5])
    assert torch.equal(ties([t1, t2], weights, 0.5), torch.tensor([3.0, -2.0, 0.0, 2.0]))
    stacked = torch.stack([t1, t2])
    assert torch.equal(majority_sign_mask(stacked, "frequency"), torch.tensor([[True, True, True, True],
                                                                                [False, True, True, True]]))
    assert torch.equal(disjoint_merge(stacked, torch.ones_like(stacked, dtype=torch.bool)), stacked.mean(0))


def test_dare_keeps_about_density_and_rescales():
    torch.manual_seed(0)
    tensor = torch.ones(20000)
    pruned = randomly_pruned(tensor, 0.3)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(pruned[kept], torch.full_like(pruned[kept], 1 / 0.3))
    torch.manual_seed(1)
    merged = dare_linear([tensor, 2 * tensor], torch.tensor([1.0, 1.0]), 0.5)
    assert abs(merged.mean().item() - 3.0) < 0.1  # the rescale keeps the expectation


# ---- combination types on a model ------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_cat_is_exactly_the_weighted_sum_of_updates(rslora):
    model = two_adapters(use_rslora=rslora)
    model.add_weighted_adapter(["a", "b"], [0.7, -1.5], "mix", combination_type="cat")
    for path, layer in lora_layers(model).items():
        assert layer.scaling["mix"] == 1.0 and layer.r["mix"] == 8
        want = 0.7 * update(layer, "a") - 1.5 * update(layer, "b")
        torch.testing.assert_close(update(layer, "mix"), want, atol=1e-6, rtol=1e-5, msg=path)


def test_svd_is_the_best_approximation_at_the_requested_rank():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=3)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]  # holds both adapters: the sum has rank 8
    total = update(layer, "a") + update(layer, "b")
    u, s, vh = torch.linalg.svd(total)
    torch.testing.assert_close(update(layer, "mix"), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    o_proj = lora_layers(model)["model.layers.0.self_attn.o_proj"]  # only "b": rank 4 truncated to 3
    assert torch.linalg.matrix_rank(update(o_proj, "mix")) == 3


def test_linear_of_one_adapter_scales_it():
    model = two_adapters()
    model.add_weighted_adapter(["a"], [2.0], "twice", combination_type="ties", density=0.1)  # one adapter: linear
    for layer in lora_layers(model).values():
        if layer.has_adapter("a"):
            torch.testing.assert_close(update(layer, "twice"), 2 * update(layer, "a"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("combination_type", list(COMBINATION_TYPES))
def test_every_type_makes_an_adapter_that_saves_loads_and_deletes(combination_type, tmp_path):
    model = two_adapters()
    density = 0.5 if any(k in combination_type for k in ("ties", "dare", "magnitude")) else None
    model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type=combination_type, density=density)
    assert model.active_adapters == ["a"]
    model.set_adapter("mix")
    out = model(input_ids=IDS).logits
    assert not torch.allclose(out, tiny_llama()(input_ids=IDS).logits, atol=1e-4)
    model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix"))
    torch.testing.assert_close(loaded(input_ids=IDS).logits, out, atol=0, rtol=0)
    model.set_adapter("a")
    model.delete_adapter("mix")
    assert "mix" not in model.peft_config and not any(m.has_adapter("mix") for m in lora_layers(model).values())


def test_a_trained_module_copy_is_taken_over(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    wrapper = model.get_base_model().lm_head
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.add_(1.0)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert torch.equal(wrapper.modules_to_save["mix"].weight, wrapper.modules_to_save["a"].weight)


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(adapters=[], weights=[]), "adapters must be a non-empty list"),
    (dict(adapters="a", weights=[1.0]), "adapters must be a non-empty list"),
    (dict(adapters=["a", "zz"], weights=[1.0, 1.0]), "Adapter zz does not exist"),
    (dict(adapters=["a", "b"], weights=[1.0]), r"weights must give one number per adapter \(2\)"),
    (dict(adapters=["a", "b"], weights=[1.0, "x"]), "weights must be numbers"),
    (dict(adapters=["a", "a"], weights=[1.0, 1.0]), "lists an adapter twice"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "Adapter with name 'a' already exists"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="double"), "'double' is already a method"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="avg"), "combination_type='avg' is not one of"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties"), r"needs density in \[0, 1\]"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="dare_ties", density=1.5), "needs density"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties", density=0.5, majority_sign_method="max"),
     "majority_sign_method must be one of"),
    (dict(adapters=["a", "b"], weights=[1, 1], svd_rank=0), "svd_rank must be a positive integer"),
])
def test_bad_arguments_are_refused_and_leave_no_adapter(kwargs, message):
    model = two_adapters()
    kwargs.setdefault("adapter_name", "mix")
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(**kwargs)
    assert sorted(model.peft_config) == ["a", "b"]
    assert not any(m.has_adapter("mix") for m in lora_layers(model).values())


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_factor_wise_types_need_equal_ranks(combination_type):
    model = two_adapters(r_b=2)
    with pytest.raises(ValueError, match=r"all adapters need the same r; got \{'a': 4, 'b': 2\}"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type=combination_type, density=0.5)
    model.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="cat")  # cat and svd mix ranks
    assert model.peft_config["mix"].r == 6


def test_dora_adapters_and_two_trained_copies_are_refused():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"cannot combine DoRA adapters \(a\)"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each train their own copy of lm_head"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix")
