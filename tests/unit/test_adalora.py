"""AdaLoRA (methods/adalora): the SVD-form layer, the budget schedule, importance and masks, the orthogonality
penalty, the rank pattern in saved files, the user-loop API, and bad input. PEFT comparisons are in
tests/interop/test_adalora_interop.py; trainer runs in tests/unit/test_adalora_training.py."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdaLoraConfig, PeftModel, get_peft_model
from lorakit.methods.adalora import RankAllocator, budget_schedule
from tests.tiny import tiny_llama
from tests.toy_task import train_on_toy_task


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 10)
        self.c = nn.Linear(10, 6)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def config(**options) -> AdaLoraConfig:
    return AdaLoraConfig(**{"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["a", "b", "c"],
                            **options})


def test_layer_is_alpha_over_ranknum_times_p_diag_e_q():
    model = get_peft_model(Three(), config(init_lora_weights=False, lora_alpha=3))
    layer = model.get_base_model().b
    q, e, p = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    assert q.shape == (4, 12) and e.shape == (4, 1) and p.shape == (10, 4)
    assert layer.ranknum["default"].item() == 4 and not layer.ranknum["default"].requires_grad
    x = torch.randn(3, 12)
    delta = p @ torch.diag(e.view(-1)) @ q * 3 / (4 + 1e-5)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), delta, atol=1e-6, rtol=1e-6)


def test_identity_init_and_what_trains():
    model = get_peft_model(Three(), config())
    assert torch.equal(model(X), Three()(X))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == sum(4 * d_in + 4 + 4 * d_out
                                                           for d_in, d_out in ((8, 12), (12, 10), (10, 6)))
    assert not any("ranknum" in n for n in trainable)
    layer = model.get_base_model().a
    assert torch.all(layer.lora_E["default"] == 0) and 0.01 < layer.lora_A["default"].std() < 0.03


def test_budget_schedule_is_cubic_between_tinit_and_total_step_minus_tfinal():
    cfg = AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=100, deltaT=5)
    init, target = 12 * 6, 4 * 6
    schedule = {step: budget_schedule(step, cfg, init, target) for step in range(0, 101)}
    assert all(schedule[s] == (init, False) for s in range(0, 11))  # warm-up: everything kept, nothing masked
    for step in range(11, 81):  # budget phase: b = bT + (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3
        expected = math.floor(target + (init - target) * (1 - (step - 10) / 70) ** 3)
        assert schedule[step] == (expected, step % 5 == 0), step
    assert all(schedule[s] == (target, True) for s in range(81, 101))  # final fine-tuning at the target budget
    assert schedule[45][0] == 24 + math.floor(48 * 0.125)  # halfway through the phase: 1/8 of the excess left


def test_importance_is_the_product_of_the_two_emas_and_masks_prune_the_least_important():
    model = get_peft_model(Three(), config(init_lora_weights=False, beta1=0.5, beta2=0.75))
    tuner = model.tuners["default"]
    allocator = tuner.allocator
    layers = model.get_base_model()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grads[name] = torch.randn_like(param)
            param.grad = grads[name].clone()
    allocator.update_importance()
    # one update from zero: Ibar = (1 - b1) I, U = (1 - b2) |I - Ibar|, score = Ibar * U
    for path in "abc":
        for factor in ("lora_A", "lora_E", "lora_B"):
            param = getattr(layers.get_submodule(path), factor)["default"]
            sensitivity = (param * grads[f"base_model.model.{path}.{factor}.default"]).abs()
            ibar = 0.5 * sensitivity
            torch.testing.assert_close(allocator.exp_avg_ipt[f"{path}.{factor}"], ibar)
            torch.testing.assert_close(allocator.exp_avg_unc[f"{path}.{factor}"], 0.25 * (sensitivity - ibar).abs())
    importance = allocator.triplet_importance()
    for path in "abc":
        score = {f: allocator.exp_avg_ipt[f"{path}.{f}"] * allocator.exp_avg_unc[f"{path}.{f}"]
                 for f in ("lora_A", "lora_E", "lora_B")}
        expected = score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
        torch.testing.assert_close(importance[path], expected)
    pattern = allocator.mask_to_budget(7)  # 12 triplets in all: prune the 5 least important
    everything = torch.cat([importance[p] for p in "abc"])
    pruned = set(everything.argsort()[:5].tolist())
    flat = [kept for p in "abc" for kept in pattern[p]]
    assert {i for i, kept in enumerate(flat) if not kept} == pruned
    for path in "abc":
        e = layers.get_submodule(path).lora_E["default"].view(-1)
        assert all((e[i] == 0) == (not kept) for i, kept in enumerate(pattern[path]))


def test_orthogonality_penalty_is_the_mean_frobenius_norm_of_the_gram_deviations():
    model = get_peft_model(Three(), config(init_lora_weights=False, orth_reg_weight=0.3))
    tuner = model.tuners["default"]
    norms = []
    for path in "abc":
        layer = model.get_base_model().get_submodule(path)
        q, p = layer.lora_A["default"], layer.lora_B["default"]
        norms.append(torch.sqrt(((q @ q.T - torch.eye(4)) ** 2).sum()))  # ||Q Q^T - I||_F
        norms.append(torch.sqrt(((p.T @ p - torch.eye(4)) ** 2).sum()))  # ||P^T P - I||_F
    expected = sum(norms) / 6
    torch.testing.assert_close(tuner.orthogonality_penalty(), expected)
    hook = tuner.training_hooks()[0]
    torch.testing.assert_close(hook.extra_loss(model), 0.3 * expected)
    # orthonormal factors have no penalty, and its gradient pulls towards orthonormal ones
    with torch.no_grad():
        for path in "abc":
            layer = model.get_base_model().get_submodule(path)
            layer.lora_A["default"].copy_(torch.linalg.qr(torch.randn(layer.in_features, 4))[0].T)
            layer.lora_B["default"].copy_(torch.linalg.qr(torch.randn(layer.out_features, 4))[0])
    assert tuner.orthogonality_penalty().item() < 1e-5
    assert get_peft_model(Three(), config(orth_reg_weight=0.0)).tuners["default"].training_hooks()[0].extra_loss(
        None) is None


def test_the_loss_a_model_computes_includes_the_penalty_as_in_peft():
    model = get_peft_model(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=["q_proj"],
                                                       init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with_penalty = model(input_ids=ids, labels=ids).loss
    plain = model.get_base_model()(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_penalty - plain, 0.5 * model.tuners["default"].orthogonality_penalty())


def drive(model, steps, seed=0):
    """Random gradients and update_and_allocate(step) for steps 1..steps, as a user loop would."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.randn(param.shape, generator=gen)
        model.base_model.update_and_allocate(step)
        model.zero_grad()


def test_update_and_allocate_on_base_model_runs_the_whole_schedule():
    model = get_peft_model(Three(), config(init_lora_weights=False, tinit=2, tfinal=3))
    drive(model, 2)
    assert model.peft_config["default"].rank_pattern is None  # warm-up: nothing pruned yet
    drive(model, 7)  # the final allocation is at step 10 - 3 = 7
    pattern = model.peft_config["default"].rank_pattern
    assert sorted(pattern) == ["a.lora_E", "b.lora_E", "c.lora_E"]
    assert sum(sum(kept) for kept in pattern.values()) == 2 * 3
    allocator = model.tuners["default"].allocator
    assert allocator.exp_avg_ipt == {}  # dropped after the final allocation
    # after it, every step re-applies the final pattern, whatever the gradient step revived
    layer = model.get_base_model().a
    with torch.no_grad():
        layer.lora_E["default"].fill_(1.0)
    drive(model, 9)
    assert model.peft_config["default"].rank_pattern == pattern
    assert [bool(v != 0) for v in layer.lora_E["default"].view(-1)] == pattern["a.lora_E"]


def test_update_and_allocate_needs_the_gradients():
    model = get_peft_model(Three(), config())
    with pytest.raises(ValueError, match=r"a\.lora_A has no gradient; update_and_allocate needs this step's "
                                         r"gradients \(call it after loss.backward\(\) and optimizer.step\(\), before "
                                         r"optimizer.zero_grad\(\)\)"):
        model.base_model.update_and_allocate(1)


def test_saving_during_training_keeps_only_the_kept_triplets_and_loads_back_equal(tmp_path):
    model = get_peft_model(Three(), config(init_lora_weights=False, tfinal=2))
    drive(model, 8)
    pattern = model.peft_config["default"].rank_pattern
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for path in "abc":
        kept = pattern[f"{path}.lora_E"]
        live = model.get_base_model().get_submodule(path)
        assert live.lora_E["default"].shape == (4, 1)  # training keeps the full rank, masked
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (sum(kept), 1)
        assert tensors[f"base_model.model.{path}.lora_A"].shape == (sum(kept), live.in_features)
        assert tensors[f"base_model.model.{path}.lora_B"].shape == (live.out_features, sum(kept))
        assert not any(k.endswith("ranknum") for k in tensors)
    loaded = PeftModel.from_pretrained(Three(), str(tmp_path))
    assert loaded.peft_config["default"].rank_pattern == pattern
    # the kept ranks only against the full rank masked: other matmul shapes, another summation order (fp32 ulps)
    torch.testing.assert_close(loaded(X), model(X), atol=1e-6, rtol=1e-5)
    resaved = tmp_path / "again"
    loaded.save_pretrained(resaved)
    assert {k: v.shape for k, v in load_file(resaved / "adapter_model.safetensors").items()} == \
        {k: v.shape for k, v in tensors.items()}


def test_a_layer_whose_triplets_were_all_pruned_loads_at_rank_zero(tmp_path):
    pattern = {"a.lora_E": [False] * 4, "b.lora_E": [True, False, True, True], "c.lora_E": [True] * 4}
    model = get_peft_model(Three(), config(rank_pattern=pattern))
    a, b = model.get_base_model().a, model.get_base_model().b
    assert a.r["default"] == 0 and a.ranknum["default"].item() == 0 and a.lora_A["default"].shape == (0, 8)
    assert b.r["default"] == 3 and b.ranknum["default"].item() == 4  # the scale of the trained rank
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Three(), str(tmp_path))
    assert torch.equal(loaded(X), model(X))


def test_a_config_without_total_step_is_refused_when_the_adapter_is_made():
    cfg = AdaLoraConfig(init_r=4, target_r=2, target_modules=["a"])  # allowed, so a run config can leave it out
    with pytest.raises(ValueError, match=r"AdaLoraConfig.total_step is required \(as in PEFT\): the number of "
                                         r"optimizer steps .* got None. Give a positive integer"):
        get_peft_model(Three(), cfg)
    assert cfg.fill_from_run(40).total_step == 40 and config().fill_from_run(40).total_step == 10


BAD_CONFIGS = {
    "schedule without a budget phase": (
        dict(tinit=6, tfinal=4, total_step=10),
        r"AdaLoraConfig: tinit=6 and tfinal=4 leave no budget phase in total_step=10 steps; tinit \+ tfinal must be "
        r"below total_step"),
    "target above init": (dict(target_r=6), r"AdaLoraConfig.target_r=6 must be at most init_r=4"),
    "zero init_r": (dict(init_r=0), r"AdaLoraConfig.init_r must be a positive integer, got 0"),
    "negative tinit": (dict(tinit=-1), r"AdaLoraConfig.tinit must be an integer >= 0 .* got -1"),
    "zero deltaT": (dict(deltaT=0), r"AdaLoraConfig.deltaT must be a positive integer, got 0"),
    "beta of one": (dict(beta1=1.0), r"AdaLoraConfig.beta1 must be in \(0, 1\), got 1.0"),
    "negative orth weight": (dict(orth_reg_weight=-0.1), r"AdaLoraConfig.orth_reg_weight must be in \[0.0, inf\), "
                                                         r"got -0.1"),
    "zero total_step": (dict(total_step=0), r"AdaLoraConfig.total_step must be a positive integer, got 0"),
    "bias": (dict(bias="vera_only"), r"AdaLoraConfig.bias must be one of 'none', 'all', 'lora_only'; got 'vera_only'"),
    "gaussian init": (dict(init_lora_weights="gaussian"),
                      r"AdaLoraConfig.init_lora_weights must be True or False, got 'gaussian'"),
    "rank pattern of ranks": (dict(rank_pattern={"a.lora_E": 2}),
                              r"AdaLoraConfig.rank_pattern\['a.lora_E'\] must be a list of booleans"),
    "rank pattern key": (dict(rank_pattern={"a": [True]}), r"AdaLoraConfig.rank_pattern key 'a' must name a module's "
                                                           r"lora_E"),
}


@pytest.mark.parametrize("options,message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_values_name_the_field_the_value_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        config(**options)


def test_fill_from_run_says_where_total_step_came_from():
    cfg = AdaLoraConfig(tinit=5, tfinal=5, target_modules=["a"])
    with pytest.raises(ValueError, match=r"leave no budget phase in total_step=8 steps.*\(total_step was filled from "
                                         r"the run: 8 optimizer steps\)"):
        cfg.fill_from_run(8)


def test_rank_patterns_that_do_not_fit_the_adapter_are_refused():
    with pytest.raises(ValueError, match=r"rank_pattern\['a.lora_E'\] has 3 entries; it needs one per initial "
                                         r"triplet, init_r=4"):
        get_peft_model(Three(), config(rank_pattern={"a.lora_E": [True, False, True]}))
    with pytest.raises(ValueError, match=r"rank_pattern names 'emb.lora_E', but this adapter does not wrap 'emb'"):
        get_peft_model(Three(), config(rank_pattern={"emb.lora_E": [True] * 4}))


def test_unused_r_warns_as_in_peft():
    with pytest.warns(UserWarning, match=r"AdaLoraConfig.r=16 is not used by AdaLoRA"):
        config(r=16)


def test_adalora_on_an_embedding_is_refused():
    with pytest.raises(TypeError, match=r"target module 'emb' is a Embedding, which adalora cannot wrap \(supported: "
                                        r"Conv1D, Conv2d, Linear, NF4Linear\)"):
        get_peft_model(Three(), config(target_modules=["a", "emb"]))


def test_each_trainable_adapter_has_its_own_allocation():
    model = get_peft_model(Three(), config(init_lora_weights=False, tfinal=2))
    model.add_adapter("other", config(init_lora_weights=False, target_modules=["a"], init_r=3, target_r=1))
    drive(model, 8)  # only the active adapter has gradients and allocates
    assert model.peft_config["default"].rank_pattern is not None and model.peft_config["other"].rank_pattern is None
    model.set_adapter("other")
    drive(model, 8)
    assert [len(v) for v in model.peft_config["other"].rank_pattern.values()] == [3]
    model.set_adapter("default")
    model.delete_adapter("other")
    assert list(model.base_model.update_and_allocate.tuners) == ["default"]


def test_allocator_state_round_trips(tmp_path):
    model = get_peft_model(Three(), config(init_lora_weights=False, tfinal=2))
    drive(model, 3)
    state = model.tuners["default"].allocator.state_dict()
    fresh = RankAllocator(model.tuners["default"].config, model.tuners["default"]._layers(), "default")
    fresh.load_state_dict(state)
    assert fresh.rank_pattern == state["rank_pattern"] and fresh.budget == state["budget"]
    assert fresh.exp_avg_ipt.keys() == model.tuners["default"].allocator.exp_avg_ipt.keys()


def test_adalora_learns_a_toy_mapping_while_the_budget_shrinks():
    """Convergence with the orthogonality penalty in the loss and pruning from rank 8 to 4 on the way."""
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]
    model = get_peft_model(tiny_llama(), AdaLoraConfig(init_r=8, target_r=4, tinit=10, tfinal=20, total_step=80,
                                                       lora_alpha=32, target_modules=targets))
    losses = train_on_toy_task(model, 80, first_step=1, after_optimizer_step=model.base_model.update_and_allocate)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(kept) for kept in pattern.values()) == 4 * len(pattern)


def test_adalora_is_exported():
    assert lorakit.AdaLoraConfig is AdaLoraConfig and lorakit.get_method("adalora").config_cls is AdaLoraConfig
