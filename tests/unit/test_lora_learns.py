"""A tiny model learns a toy mapping through LoRA alone (the base stays frozen)."""

import torch

from lorakit import LoraConfig, get_peft_model
from tests.tiny import tiny_llama


def test_lora_learns_a_toy_mapping_and_base_is_untouched():
    torch.manual_seed(0)
    # lm_head is targeted too: a random tiny base has too small logits to fit anything through its frozen head
    targets = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    # toy task: pairs (t, f(t)) for a fixed random map f over 20 token ids; loss on the f(t) positions
    gen = torch.Generator().manual_seed(0)
    mapping = torch.randperm(20, generator=gen) + 100
    src = torch.randint(10, 30, (64, 6), generator=gen)
    ids = torch.stack([src, mapping[src - 10]], dim=2).flatten(1)  # (64, 12): t1 f(t1) t2 f(t2) ...
    labels = ids.clone()
    labels[:, 0::2] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(60):
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.1 * first, (first, last)
    for name, param in model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name
