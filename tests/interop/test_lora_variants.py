"""LoRA variants against PEFT: DoRA (outputs, files both ways, initial magnitudes), PiSSA / OLoRA (the same
A, B and residual base from the same seed; the conversion to plain LoRA), rsLoRA with DoRA."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tests.interop.conftest import (
    ARCHS,
    arch_params,
    assert_adapter_acts,
    assert_same_logits,
    base_logits,
    build_ours,
    build_peft,
    logits,
    our_config,
    peft_config,
    peft_from_pretrained,
    perturb_trainable,
)

WEIGHTS = "adapter_model.safetensors"


def same_in_float64(ours, theirs, inputs) -> None:
    """Equal logits with both models in float64. DoRA divides by norms of sums; on T5 with DoRA on every linear
    layer the fp32 result of either library is 2e-4 away from its own float64 result, so the float64 comparison
    is the one that tells whether the two compute the same function (they agree to 1e-12 there)."""
    assert_same_logits(logits(ours.double(), inputs), logits(theirs.double(), inputs), atol=1e-9)


def dora_options(arch) -> dict[str, dict]:
    options = {
        "dora": dict(target_modules=arch.names, use_dora=True),
        "dora-rslora-all-linear": dict(target_modules="all-linear", r=4, lora_alpha=16, use_rslora=True,
                                       use_dora=True, rank_pattern=arch.rank_pattern, bias="lora_only"),
    }
    if arch.embedding:
        options["dora-embedding"] = dict(target_modules=[arch.embedding] + arch.names[:1], use_dora=True)
    return options


def dora_cases():
    for arch in ARCHS.values():
        for option_id, options in dora_options(arch).items():
            yield pytest.param(arch, options, id=f"{arch.name}-{option_id}")


@pytest.mark.parametrize("arch,options", list(dora_cases()))
def test_peft_dora_files_load_in_lorakit(arch, options, tmp_path):
    theirs = build_peft(arch, {"default": options})
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path)).eval()
    inputs = arch.inputs()
    assert_adapter_acts(logits(theirs, inputs), base_logits(arch, inputs))
    same_in_float64(ours, theirs, inputs)


@pytest.mark.parametrize("arch,options", list(dora_cases()))
def test_lorakit_dora_files_load_in_peft(arch, options, tmp_path):
    ours = build_ours(arch, {"default": options})
    ours.save_pretrained(str(tmp_path))
    theirs = peft_from_pretrained(arch, tmp_path)
    inputs = arch.inputs()
    assert_adapter_acts(logits(ours, inputs), base_logits(arch, inputs))
    held = peft.get_peft_model_state_dict(theirs)
    ours_file = load_file(tmp_path / WEIGHTS)
    assert any(k.endswith("lora_magnitude_vector") for k in ours_file)
    for key, tensor in ours_file.items():
        assert held[key].shape == tensor.shape and torch.equal(held[key], tensor), key
    same_in_float64(ours, theirs, inputs)


@pytest.mark.parametrize("arch", arch_params())
def test_dora_starts_with_peft_magnitudes_and_merges_like_peft(arch):
    options = dict(target_modules=arch.names, use_dora=True)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(arch.build(), peft_config(arch, **options)).eval()
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(arch.build(), our_config(arch, **options)).eval()
    held, mine = peft.get_peft_model_state_dict(theirs), ours.adapter_state_dict()
    assert set(held) == set(mine)
    for key in mine:
        assert torch.equal(held[key], mine[key]), key
    perturb_trainable(theirs, seed=3)
    perturb_trainable(ours, seed=3)
    inputs = arch.inputs()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))
    theirs.merge_adapter()
    ours.merge_adapter()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))
    ours.unmerge_adapter()
    assert_same_logits(logits(ours, inputs), logits(theirs, inputs))


def residual_init_params():
    for arch in ARCHS.values():
        for init in ("pissa", "pissa_niter_2", "olora"):
            marks = ()
            if arch.name == "gpt2" and init == "olora":
                # PEFT's olora_init factors the stored (d_in, d_out) Conv1D weight without transposing it, giving
                # an A of shape (r, d_out) whose forward fails; lorakit factors the (d_out, d_in) matrix
                marks = (pytest.mark.skip("PEFT's OLoRA does not run on GPT-2's Conv1D"),)
            yield pytest.param(arch, init, id=f"{arch.name}-{init}", marks=marks)


@pytest.mark.parametrize("arch,init", list(residual_init_params()))
def test_residual_inits_equal_peft_from_the_same_seed(arch, init):
    """The same A, B and residual base weights, bit for bit (the randomized SVD draws from the same seed)."""
    options = dict(target_modules=arch.names, init_lora_weights=init, r=4, lora_alpha=16)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(arch.build(), peft_config(arch, **options)).eval()
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(arch.build(), our_config(arch, **options)).eval()
    held, mine = peft.get_peft_model_state_dict(theirs), ours.adapter_state_dict()
    assert set(held) == set(mine)
    for key in mine:
        assert torch.equal(held[key], mine[key]), key
    their_bases = {n: p for n, p in theirs.named_parameters() if ".base_layer.weight" in n}
    our_bases = {n: p for n, p in ours.named_parameters() if ".base_layer.weight" in n}
    assert their_bases.keys() == our_bases.keys() and our_bases
    for name, weight in our_bases.items():
        assert torch.equal(weight, their_bases[name]), name
    inputs = arch.inputs()
    assert_same_logits(logits(ours, inputs), base_logits(arch, inputs))


@pytest.mark.parametrize("arch", arch_params(lambda a: a.name in ("llama", "t5")))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora_equals_peft(arch, init, tmp_path):
    """Both libraries convert a "trained" PiSSA/OLoRA adapter into the same rank-2r LoRA adapter; either library
    loads it on the original base and gets the trained model."""
    options = dict(target_modules=arch.names, init_lora_weights=init, r=2, lora_alpha=4)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(arch.build(), peft_config(arch, **options)).eval()
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(arch.build(), our_config(arch, **options)).eval()
    theirs.save_pretrained(tmp_path / "peft-init")
    ours.save_pretrained(str(tmp_path / "ours-init"))
    perturb_trainable(theirs, seed=4)
    perturb_trainable(ours, seed=4)
    inputs = arch.inputs()
    trained = logits(ours, inputs)
    assert_same_logits(trained, logits(theirs, inputs))
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))
    ours.save_pretrained(str(tmp_path / "ours"), path_initial_model_for_weight_conversion=str(tmp_path / "ours-init"))
    their_file, our_file = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    assert their_file.keys() == our_file.keys()
    for key in our_file:
        assert torch.equal(their_file[key], our_file[key]), key
    assert lorakit.LoraConfig.from_pretrained(str(tmp_path / "ours")).r == peft.LoraConfig.from_pretrained(
        str(tmp_path / "peft")).r == 4
    assert_same_logits(logits(peft_from_pretrained(arch, tmp_path / "ours"), inputs), trained)
    assert_same_logits(logits(lorakit.PeftModel.from_pretrained(arch.build(), str(tmp_path / "peft")).eval(), inputs),
                       trained)


@pytest.mark.parametrize("arch", arch_params(lambda a: a.name in ("llama", "gpt2")))
def test_dora_trains_like_peft(arch):
    """Same init, same data, same optimizer: the same losses and the same trained tensors after a few steps."""
    options = dict(target_modules="all-linear", r=4, lora_alpha=8, use_dora=True)
    models = []
    for get_peft_model, make_config in ((peft.get_peft_model, peft_config), (lorakit.get_peft_model, our_config)):
        torch.manual_seed(0)
        model = get_peft_model(arch.build(), make_config(arch, **options))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(4):
            inputs = arch.inputs(seed=step)
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        models.append((model, losses))
    (theirs, their_losses), (ours, our_losses) = models
    assert our_losses == pytest.approx(their_losses, rel=1e-5, abs=1e-5)
    assert our_losses[-1] < our_losses[0]
    held, mine = peft.get_peft_model_state_dict(theirs), ours.adapter_state_dict()
    for key in mine:
        torch.testing.assert_close(mine[key], held[key], atol=1e-4, rtol=1e-4, msg=key)
