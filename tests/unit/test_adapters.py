"""Several named adapters in one model: switching, disabling, merging, mixed batches, errors."""

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.adapter_layer import AdapterHolder
from tests.tiny import tiny_bert_classifier, tiny_llama

IDS = torch.tensor([[5, 9, 30, 31, 40, 7], [8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25]])


def random_lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw)


@pytest.fixture
def two_adapters():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), random_lora(), "a")
    torch.manual_seed(1)
    model.add_adapter("b", random_lora())
    return model


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_add_adapter_keeps_the_active_one_and_freezes_the_new(two_adapters):
    assert two_adapters.active_adapter == "a" and two_adapters.active_adapters == ["a"]
    trainable = [n for n, p in two_adapters.named_parameters() if p.requires_grad]
    assert trainable and all(".a." in n for n in trainable)
    two_adapters.set_adapter("b")
    assert all(".b." in n for n, p in two_adapters.named_parameters() if p.requires_grad)


def test_adapter_name_errors(two_adapters):
    with pytest.raises(ValueError, match="already exists"):
        two_adapters.add_adapter("b", random_lora())
    with pytest.raises(ValueError, match="no adapter named 'c' to delete"):
        two_adapters.delete_adapter("c")
    with pytest.raises(ValueError, match="'a' is active"):
        two_adapters.delete_adapter("a")
    with pytest.raises(ValueError, match=r"no adapter named \['zzz'\]"):
        two_adapters.set_adapter("zzz")
    with pytest.raises(ValueError, match="not allowed"):
        two_adapters.add_adapter("x.y", random_lora())


def test_disable_adapter_runs_the_base_model(two_adapters):
    base = logits(tiny_llama())
    tuned = logits(two_adapters)
    with two_adapters.disable_adapter():
        torch.testing.assert_close(logits(two_adapters), base)
    torch.testing.assert_close(logits(two_adapters), tuned)


def test_disable_adapter_while_merged_then_merged_again(two_adapters):
    base, tuned = logits(tiny_llama()), logits(two_adapters)
    two_adapters.merge_adapter()
    with two_adapters.disable_adapter():
        torch.testing.assert_close(logits(two_adapters), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(two_adapters), tuned, atol=1e-5, rtol=1e-5)
    assert two_adapters.get_base_model().model.layers[0].self_attn.q_proj.merged_adapters == ["a"]


def test_several_active_adapters_add_up(two_adapters):
    only_a = logits(two_adapters)
    two_adapters.set_adapter("b")
    only_b = logits(two_adapters)
    two_adapters.set_adapter(["a", "b"])
    assert two_adapters.active_adapter == ["a", "b"]
    both = logits(two_adapters)
    assert not torch.allclose(both, only_a, atol=1e-3) and not torch.allclose(both, only_b, atol=1e-3)
    # a single linear layer is exactly additive; check one
    layer = two_adapters.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    a, b = (layer.lora_B[n].weight @ layer.lora_A[n].weight * layer.scaling[n] for n in ("a", "b"))
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + a + b).T, atol=1e-5, rtol=1e-5)


def test_delete_adapter_removes_its_tensors_and_unwraps_empty_layers():
    model = get_peft_model(tiny_llama(), random_lora(), "a")
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"]))
    model.delete_adapter("b")
    assert not any(".b." in n for n, _ in model.named_parameters())
    model.add_adapter("c", LoraConfig(target_modules=["q_proj"]))
    model.set_adapter("c")
    model.delete_adapter("a")
    attn = model.get_base_model().model.layers[0].self_attn
    assert isinstance(attn.q_proj, AdapterHolder) and type(attn.k_proj).__name__ == "Linear"


def test_merge_and_unload_returns_the_plain_model(two_adapters):
    expected = logits(two_adapters)
    plain = two_adapters.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, AdapterHolder) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)


def test_unload_restores_the_original_weights(two_adapters):
    two_adapters.merge_adapter()
    plain = two_adapters.unload()
    reference = tiny_llama()
    for (name, p), (_, q) in zip(plain.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_safe_merge_refuses_nan_and_merges_nothing(two_adapters):
    with torch.no_grad():
        two_adapters.get_base_model().model.layers[1].mlp.up_proj.lora_B["a"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in two_adapters.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="NaN/inf into model.layers.1.mlp.up_proj"):
        two_adapters.merge_adapter(safe_merge=True)
    after = two_adapters.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not torch.isnan(before[k]).any())


def test_mixed_batch_forward_and_generate(two_adapters):
    names = ["b", "__base__", "a"]
    mixed = logits(two_adapters, adapter_names=names)
    expected = []
    for row, name in enumerate(names):
        if name == "__base__":
            with two_adapters.disable_adapter():
                expected.append(logits(two_adapters, IDS[row:row + 1]))
        else:
            two_adapters.set_adapter(name)
            expected.append(logits(two_adapters, IDS[row:row + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected), atol=1e-5, rtol=1e-5)

    generated = two_adapters.generate(input_ids=IDS, adapter_names=names, max_new_tokens=5, do_sample=False)
    for row, name in enumerate(names):
        if name == "__base__":
            with two_adapters.disable_adapter():
                alone = two_adapters.generate(input_ids=IDS[row:row + 1], max_new_tokens=5, do_sample=False)
        else:
            two_adapters.set_adapter(name)
            alone = two_adapters.generate(input_ids=IDS[row:row + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[row], alone[0])


def test_mixed_batch_errors(two_adapters):
    with pytest.raises(ValueError, match="unknown adapters \\['zzz'\\]"):
        logits(two_adapters, adapter_names=["a", "zzz", "a"])
    with pytest.raises(ValueError, match="2 entries but the batch has 3 rows"):
        logits(two_adapters, adapter_names=["a", "b"])
    two_adapters.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        logits(two_adapters, adapter_names=["a", "b", "a"])


def test_mixed_batch_with_a_trained_classifier_head():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), random_lora(task_type="SEQ_CLS"), "a")
    torch.manual_seed(1)
    model.add_adapter("b", random_lora(task_type="SEQ_CLS"))
    with torch.no_grad():
        model.get_base_model().classifier.modules_to_save["b"].weight.add_(1.0)
    mixed = logits(model, adapter_names=["a", "b", "__base__"])
    model.set_adapter("b")
    torch.testing.assert_close(mixed[1:2], logits(model, IDS[1:2]), atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(mixed[2:3], logits(model, IDS[2:3]), atol=1e-5, rtol=1e-5)


def test_generate_and_attributes_are_forwarded(two_adapters):
    assert two_adapters.config.model_type == "llama"
    assert two_adapters.get_base_model().config is two_adapters.config
    out = two_adapters.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_wrapping_twice_is_refused(two_adapters):
    with pytest.raises(TypeError, match="already has adapters"):
        PeftModel(two_adapters, random_lora())


def test_new_adapter_layers_follow_the_model_mode():
    """A model loaded for inference (eval mode) must not get dropout active in its new LoRA layers."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert not model.training and not layer.lora_dropout["default"].training
    first, second = logits(model), logits(model)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    model.train()
    assert layer.lora_dropout["default"].training
