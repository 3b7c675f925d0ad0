"""AdaLoRA against PEFT: files cross both ways (also after the budget pruned triplets, when a file holds only the
kept ones and the config the rank pattern), the same logits, merges and loss (with the orthogonality penalty), and
the rank allocation itself: fed the same weights and gradients step by step, both libraries compute the same
importance, budgets, masks and E values."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tests.interop.conftest import (
    ARCHS,
    Arch,
    arch_params,
    assert_adapter_acts,
    assert_same_logits,
    base_logits,
    logits,
)

WEIGHTS = "adapter_model.safetensors"
ADALORA_ARCHS = arch_params(lambda a: a.name in ("llama", "gpt2"))
# tinit 1, budget phase up to step 7 masking every 2 steps, final pattern at step 7, then 2 steps with it
SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=9, deltaT=2)


def peft_from_pretrained(arch: Arch, directory) -> peft.PeftModel:
    """PEFT loads the files with no warning about keys, but one it gives for its own AdaLoRA files too: LoRA's
    rank_pattern matching (name -> rank) does not recognise AdaLoRA's keys (module.lora_E -> mask) when it injects;
    the resize to the pattern's ranks happens when the weights load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(arch.build(), str(directory))
    notes = [str(w.message) for w in caught if "key" in str(w.message).lower()
             and not str(w.message).startswith("The following rank_pattern keys did not match")]
    assert not notes, f"PEFT warned while loading lorakit's files: {notes}"
    return model.eval()


def adalora_options(arch: Arch, **extra) -> dict:
    return {**SCHEDULE, "target_modules": arch.names + arch.suffixes, "lora_alpha": 4, **arch.extra, **extra}


def build(arch: Arch, library, seed: int = 0, **options):
    """An AdaLoRA model of `library` whose every triplet acts: P, Q ~ N(0, 1) scaled down, E ~ N(0, 1)."""
    torch.manual_seed(seed)
    config = library.AdaLoraConfig(task_type=arch.task_type, init_lora_weights=False, **copy.deepcopy(options))
    model = library.get_peft_model(arch.build(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.mul_(0.2)
    return model


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def allocate_with_random_gradients(models, steps, seed: int = 5):
    """Give every model the same gradients and SGD step, then call update_and_allocate(step) on each, for steps
    1..steps (the numbering lorakit's trainer uses). Returns per step the models' E tensors and rank patterns."""
    params = [trainable(m) for m in models]
    assert all(p.keys() == params[0].keys() for p in params)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(1, steps + 1):
        for name in sorted(params[0]):
            grad = torch.randn(params[0][name].shape, generator=gen)
            for p in params:
                p[name].grad = grad.clone()
                with torch.no_grad():
                    p[name].sub_(0.01 * grad)
        for model in models:
            model.base_model.update_and_allocate(step)
        history.append([({n: t.detach().clone() for n, t in p.items() if ".lora_E." in n},
                         normalised_pattern(m.peft_config["default"].rank_pattern)) for m, p in zip(models, params)])
    for p in params:
        for tensor in p.values():
            tensor.grad = None
    return history


def normalised_pattern(pattern):
    """PEFT keeps the adapter name in the keys until it saves; lorakit never writes it."""
    return {k.replace(".lora_E.default", ".lora_E"): list(v) for k, v in (pattern or {}).items()}


@pytest.mark.parametrize("arch", ADALORA_ARCHS)
def test_rank_allocation_equals_peft_step_by_step(arch, tmp_path):
    theirs = build(arch, peft, **adalora_options(arch))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path), is_trainable=True)
    history = allocate_with_random_gradients([theirs, ours], steps=11)
    budgets = []
    for step, ((their_e, their_pattern), (our_e, our_pattern)) in enumerate(history, start=1):
        assert our_pattern == their_pattern, f"step {step}"
        for name in their_e:
            assert torch.equal(our_e[name], their_e[name]), f"step {step}: {name}"
        budgets.append(sum(sum(kept) for kept in our_pattern.values()) if our_pattern else None)
    layers = len(arch.names + arch.suffixes) * 2
    init, target = 6 * layers, 2 * layers

    def cubic(step):  # the budget between tinit = 1 and total_step - tfinal = 7
        return int((init - target) * (1 - (step - 1) / 6) ** 3 + target)

    # no pattern during tinit; masks at the even steps of the budget phase; the target budget from step 7 on
    assert budgets == [None, cubic(2), cubic(2), cubic(4), cubic(4), cubic(6), target, target, target, target, target]
    assert init > cubic(2) > cubic(4) > target  # guards the comparison: the budget really falls


@pytest.mark.parametrize("arch", ADALORA_ARCHS)
def test_peft_files_load_in_lorakit_before_and_after_rank_reduction(arch, tmp_path):
    theirs = build(arch, peft, **adalora_options(arch))
    inputs = arch.inputs()
    theirs.eval().save_pretrained(tmp_path / "full")
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path / "full"))
    expected = logits(theirs, inputs)
    assert_adapter_acts(expected, base_logits(arch, inputs))
    assert_same_logits(logits(ours, inputs), expected)

    allocate_with_random_gradients([theirs.train()], steps=9)
    theirs.eval().save_pretrained(tmp_path / "pruned")
    pattern = theirs.peft_config["default"].rank_pattern
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path / "pruned"))
    for key, kept in pattern.items():
        layer = ours.get_base_model().get_submodule(key.removesuffix(".lora_E"))
        assert layer.lora_E["default"].shape == (sum(kept), 1) and layer.ranknum["default"].item() == (6 if any(kept)
                                                                                                       else 0)
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))


@pytest.mark.parametrize("arch", ADALORA_ARCHS)
def test_lorakit_files_load_in_peft_before_and_after_rank_reduction(arch, tmp_path):
    ours = build(arch, lorakit, **adalora_options(arch))
    inputs = arch.inputs()
    ours.eval().save_pretrained(tmp_path / "full")
    expected = logits(ours, inputs)
    assert_adapter_acts(expected, base_logits(arch, inputs))
    assert_same_logits(logits(peft_from_pretrained(arch, tmp_path / "full"), inputs), expected)

    allocate_with_random_gradients([ours.train()], steps=9)
    ours.eval().save_pretrained(tmp_path / "pruned")
    pattern = lorakit.PeftConfig.from_pretrained(str(tmp_path / "pruned")).rank_pattern
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)  # target_r per layer on average
    tensors = load_file(tmp_path / "pruned" / WEIGHTS)
    for key, kept in pattern.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(kept), 1)
        assert tensors[f"base_model.model.{key.replace('lora_E', 'lora_B')}"].shape[1] == sum(kept)
    theirs = peft_from_pretrained(arch, tmp_path / "pruned")
    assert_same_logits(logits(theirs, inputs), logits(ours, inputs))
    # and back: the pruned file loads in lorakit at the pattern's ranks, with the same logits
    again = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path / "pruned"))
    assert_same_logits(logits(again, inputs), logits(ours, inputs))


@pytest.mark.parametrize("arch", ADALORA_ARCHS)
def test_merged_weights_and_training_loss_equal_peft(arch, tmp_path):
    theirs = build(arch, peft, **adalora_options(arch))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path), is_trainable=True)
    inputs = arch.inputs()
    labels = {**inputs, "labels": inputs["input_ids"]}
    # the model's loss carries the orthogonality penalty (PEFT's forward adds it; so does lorakit's)
    their_loss, our_loss = theirs(**labels).loss, ours(**labels).loss
    plain_loss = ours.get_base_model()(**labels).loss
    assert our_loss - plain_loss > 0.01
    torch.testing.assert_close(our_loss, their_loss, atol=1e-5, rtol=1e-6)
    ours_merged, theirs_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    for key, value in theirs_merged.state_dict().items():
        torch.testing.assert_close(ours_merged.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_adalora_config_fields_read_as_peft_reads_them(tmp_path):
    arch = ARCHS["llama"]
    config = lorakit.AdaLoraConfig(init_r=5, target_r=3, tinit=2, tfinal=4, deltaT=3, beta1=0.8, beta2=0.9,
                                   orth_reg_weight=0.2, total_step=50, lora_alpha=16, lora_dropout=0.1,
                                   target_modules=["q_proj"], task_type=arch.task_type)
    lorakit.get_peft_model(arch.build(), config).save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.AdaLoraConfig)
    for field in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                  "lora_alpha", "lora_dropout", "rank_pattern"):
        assert getattr(theirs, field) == getattr(config, field), field
