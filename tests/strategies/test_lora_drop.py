"""LoRA-drop (train/strategies/lora_drop.py): block importance measured on the sample equals a direct computation,
blocks are kept up to the cumulative threshold and the rest share one adapter, which trains, saves, resumes,
and loads in lorakit and PEFT."""

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.adapter_layer import AdapterLayer
from lorakit.models.loading import load_model_and_tokenizer
from lorakit.train.data import build_datasets, make_collator
from lorakit.train.hooks import RunContext
from lorakit.train.loop import run_training, set_seed
from lorakit.train.setup import prepare_model
from lorakit.train.strategies.lora_drop import LoraDrop, select_blocks
from tests.strategies.support import LEARNS, first_loss_and_last, four_block_llama, spy_run, straight_and_resumed
from tests.train_fixtures import as_the_default_run_rounds_it, one_torch_thread, tiny_run_config  # noqa: F401

DROP = ("train.max_steps=6", "train.lora_drop_threshold=0.5", "train.lora_drop_warmup_steps=4",
        "train.lora_drop_sample_ratio=0.5")
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def built(tmp_path, *overrides):
    """(model, hook) as a run builds them, before setup()."""
    cfg = tiny_run_config(tmp_path, *DROP, *overrides, model=four_block_llama(tmp_path))
    set_seed(cfg.train.seed)
    base, tokenizer = load_model_and_tokenizer(cfg.model, device="cpu")
    rows, _, _ = build_datasets(cfg.data, tokenizer, cfg.task_type)
    set_seed(cfg.train.seed)
    model = prepare_model(base, cfg)
    run = RunContext(rows, make_collator(cfg.data, tokenizer), torch.device("cpu"), model_config=model.config)
    return model, LoraDrop(model, cfg, run)


def lora_layer(model, block: int, kind: str) -> AdapterLayer:
    return model.get_base_model().get_submodule(f"model.layers.{block}.{kind}")


def test_importance_equals_a_direct_computation(tmp_path):
    model, hook = built(tmp_path)
    sample = hook.sample_rows()
    assert len(sample) == 12  # ratio 0.5 of 24 rows
    hook.warm_up(sample)
    measured = hook.measure(sample)

    # directly: each layer's input x, its update s B A as a matrix, || (s B A) x ||^2 over unpadded tokens
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = [lora_layer(model, b, k).register_forward_pre_hook(
        lambda m, args, key=(b, k): inputs.setdefault(key, []).append(args[0].detach())) for b in range(4)
        for k in KINDS]
    masks = []
    model.eval()
    with torch.no_grad():
        for batch in hook.batches(sample):
            masks.append(batch["attention_mask"].float())
            model(**{k: v for k, v in batch.items() if k != "labels"})
    for handle in handles:
        handle.remove()
    totals = [0.0] * 4
    with torch.no_grad():
        for (block, kind), xs in inputs.items():
            update = lora_layer(model, block, kind).delta_weight("default")
            for x, mask in zip(xs, masks):
                totals[block] += float((((x @ update.T) ** 2).sum(-1) * mask).sum())
    expected = [t / sum(totals) for t in totals]
    assert measured == pytest.approx(expected, rel=1e-4)
    assert sum(measured) == pytest.approx(1.0) and min(measured) > 0


def test_blocks_are_kept_up_to_the_cumulative_threshold():
    importance = [0.1, 0.5, 0.3, 0.1]
    assert select_blocks(importance, 0.5) == [1]
    assert select_blocks(importance, 0.7) == [1, 2]
    assert select_blocks(importance, 0.8) == [1, 2]  # 0.5 + 0.3 reaches 0.8
    assert select_blocks(importance, 0.85) == [0, 1, 2]  # a tie (0.1, 0.1): the earlier block
    assert select_blocks(importance, 1.0) == [0, 1, 2, 3]


def test_kept_blocks_own_their_adapters_and_the_others_share_one(tmp_path):
    model, hook = built(tmp_path, "train.lora_drop_threshold=0.4")
    per_block = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n)
    initial = {(b, k): lora_layer(model, b, k).lora_A["default"].weight.detach().clone() for b in range(4)
               for k in KINDS}
    hook.setup(model)
    kept, dropped = hook.kept, [b for b in range(4) if b not in hook.kept]
    assert kept == select_blocks(hook.importance, 0.4) and len(dropped) >= 2
    for kind in KINDS:
        owners = {id(lora_layer(model, b, kind).lora_A["default"]) for b in dropped}
        assert len(owners) == 1  # one module object in every dropped block
        assert len({id(lora_layer(model, b, kind).lora_B["default"]) for b in dropped}) == 1
        for b in kept:
            assert id(lora_layer(model, b, kind).lora_A["default"]) not in owners
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # shared tensors count once
    assert trainable == per_block * (len(kept) + 1)
    # back to the initialisation (the warm-up trained it): B = 0, each A as drawn at injection, the shared A
    # the first dropped block's
    assert all(not m.lora_B["default"].weight.any() for m in model.modules() if isinstance(m, AdapterLayer))
    for (block, kind), value in initial.items():
        owner = block if block in kept else dropped[0]
        assert torch.equal(lora_layer(model, block, kind).lora_A["default"].weight, initial[(owner, kind)])


def test_the_shared_adapter_trains_saves_and_loads_in_lorakit_and_peft(tmp_path, monkeypatch):
    model_dir = four_block_llama(tmp_path)
    result, hooks = spy_run(tmp_path, monkeypatch, None, *DROP, "train.lora_drop_threshold=0.4", model=model_dir)
    drop = next(h for h in hooks if isinstance(h, LoraDrop))
    dropped = [b for b in range(4) if b not in drop.kept]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")

    def key(block, kind, matrix):
        return f"base_model.model.model.layers.{block}.{kind}.lora_{matrix}.weight"

    for kind in KINDS:  # the shared pair, written once per layer; kept blocks trained their own
        for matrix in ("A", "B"):
            shared = saved[key(dropped[0], kind, matrix)]
            assert all(torch.equal(saved[key(b, kind, matrix)], shared) for b in dropped)
            assert not any(torch.equal(saved[key(b, kind, matrix)], shared) for b in drop.kept)
    assert saved[key(dropped[0], "self_attn.q_proj", "B")].any()  # it trained

    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        # the base as the run trained against it (bf16-rounded under the default precision where bf16 is fast)
        ours = lorakit.PeftModel.from_pretrained(as_the_default_run_rounds_it(
            AutoModelForCausalLM.from_pretrained(model_dir)), str(tmp_path / "run" / "adapter")).eval()
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        theirs = peft.PeftModel.from_pretrained(as_the_default_run_rounds_it(
            AutoModelForCausalLM.from_pretrained(model_dir)), str(tmp_path / "run" / "adapter")).eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stop_step", [1, 4])
def test_resume_rebuilds_the_sharing_and_is_bit_exact(tmp_path, monkeypatch, stop_step):
    settings = (*DROP, "train.lora_drop_threshold=0.4", "train.save_steps=2", "adapter.lora_dropout=0.1")
    straight_and_resumed(tmp_path, monkeypatch, stop_step, *settings, model=four_block_llama(tmp_path))
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_lora_drop_trains(tmp_path):
    """A tiny convergence check, with half of the blocks sharing one adapter."""
    model = four_block_llama(tmp_path)
    plain = run_training(tiny_run_config(tmp_path, "train.max_steps=30", *LEARNS, model=model, output="plain"),
                         show_progress=False)
    dropped = run_training(tiny_run_config(tmp_path, "train.max_steps=30", "train.lora_drop_threshold=0.5",
                                           "train.lora_drop_warmup_steps=4", *LEARNS, model=model),
                           show_progress=False)
    first, last = first_loss_and_last(tmp_path / "run")
    assert last < 0.3 * first, (first, last)
    assert dropped.trainable_params < plain.trainable_params
