"""AdamW parameter groups (no decay on 1-D parameters), LoRA+ learning rates, warm-up + schedules."""

import math

import pytest

from lorakit import LoraConfig, get_peft_model
from lorakit.train.config import TrainArgs
from lorakit.train.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups, warmup_steps
from tests.tiny import tiny_gpt2, tiny_llama


def group_of(groups: list[dict]) -> dict[int, dict]:
    """id(parameter) -> its group."""
    return {id(p): g for g in groups for p in g["params"]}


def test_matrices_get_weight_decay_vectors_do_not_and_frozen_parameters_are_left_out():
    model = tiny_gpt2()  # has biases and LayerNorm weights
    model.transformer.wte.weight.requires_grad_(False)
    groups = parameter_groups(model, TrainArgs(learning_rate=1e-3, weight_decay=0.1))
    by_param = group_of(groups)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in by_param, name
            continue
        expected = 0.1 if param.ndim >= 2 else 0.0
        assert by_param[id(param)]["weight_decay"] == expected, name
        assert by_param[id(param)]["lr"] == 1e-3
    assert any(p.ndim == 1 for p in model.parameters() if p.requires_grad)  # the test covers both kinds
    assert len(by_param) == sum(1 for p in model.parameters() if p.requires_grad)  # each parameter once


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only"))
    args = TrainArgs(learning_rate=2e-4, loraplus_lr_ratio=16, weight_decay=0.01)
    optimizer = build_optimizer(model, args)
    by_param = group_of(optimizer.param_groups)
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n for n in names) and any(".lora_A." in n for n in names)
    for name, param in names.items():
        group = by_param[id(param)]
        assert group["lr"] == pytest.approx(2e-4 * (16 if ".lora_B." in name else 1)), name
        assert group["weight_decay"] == (0.01 if param.ndim >= 2 else 0.0), name
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_without_loraplus_every_group_has_the_base_learning_rate():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert {g["lr"] for g in parameter_groups(model, TrainArgs(learning_rate=3e-4))} == {3e-4}


def test_no_trainable_parameter_is_an_error():
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters; check finetuning_type"):
        parameter_groups(model, TrainArgs())


# warm-up 4 steps, 14 in total: warm-up (k+1)/5 at steps 0..3, then 10 steps of decay
@pytest.mark.parametrize("kind, expected", [
    ("cosine", {0: 0.2, 3: 0.8, 4: 1.0, 9: 0.5, 14: 0.0, 20: 0.0}),
    ("linear", {0: 0.2, 3: 0.8, 4: 1.0, 9: 0.5, 11: 0.3, 14: 0.0}),
    ("constant", {0: 0.2, 3: 0.8, 4: 1.0, 9: 1.0, 14: 1.0}),
])
def test_lr_factor_at_known_steps(kind, expected):
    for step, factor in expected.items():
        assert lr_factor(step, 4, 14, kind) == pytest.approx(factor, abs=1e-12), step
    if kind == "cosine":
        assert lr_factor(6, 4, 14, kind) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, 0, 10, "cosine") == 1.0 and lr_factor(0, 0, 10, "linear") == 1.0


def test_warmup_ratio_rounds_up_and_warmup_steps_wins():
    assert warmup_steps(TrainArgs(warmup_ratio=0.1), 25) == 3
    assert warmup_steps(TrainArgs(warmup_steps=2, warmup_ratio=0.5), 25) == 2
    assert warmup_steps(TrainArgs(), 25) == 0


def test_the_scheduler_applies_the_factor_to_every_group_once_per_step():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    args = TrainArgs(learning_rate=1e-3, loraplus_lr_ratio=4, warmup_steps=2, lr_scheduler="linear")
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(sorted(g["lr"] for g in optimizer.param_groups))  # the lr this optimizer step uses
        optimizer.step()
        scheduler.step()
    factors = [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]
    assert seen == [pytest.approx([1e-3 * f, 4e-3 * f]) for f in factors]
    assert scheduler.get_last_lr() == pytest.approx([0.0, 0.0])
