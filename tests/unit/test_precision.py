"""train/precision.py: which frozen weights a bf16 run stores in bf16, and giving them their dtype back."""

import torch
from torch import nn

from lorakit.train import precision


def test_frozen_fp32_weights_go_to_bf16_and_come_back_in_fp32_holding_the_rounded_values():
    torch.manual_seed(0)
    model = nn.ModuleDict({"frozen": nn.Linear(8, 8), "kept": nn.Linear(8, 8), "fp16": nn.Linear(8, 8).half(),
                           "trained": nn.Linear(8, 8)})
    for name in ("frozen", "kept", "fp16"):
        model[name].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    stored = precision.store_frozen_weights_in_bf16(model, keep={"kept.weight", "kept.bias"})
    assert stored == {"frozen.weight": torch.float32, "frozen.bias": torch.float32}
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["frozen.weight"] == torch.bfloat16
    # kept by name (a training hook merges into it), fp16 (no memory to gain), trained: untouched
    assert dtypes["kept.weight"] == dtypes["trained.weight"] == torch.float32 and dtypes["fp16.weight"] == torch.float16

    precision.restore_stored_dtypes(model, stored)
    assert stored == {}  # a second call does nothing
    after = dict(model.named_parameters())
    assert all(p.dtype == before[n].dtype for n, p in after.items())
    assert torch.equal(after["frozen.weight"], before["frozen.weight"].to(torch.bfloat16).float())
    assert not torch.equal(after["frozen.weight"], before["frozen.weight"])  # the rounding the run trained with
    assert all(torch.equal(after[n], before[n]) for n in after if not n.startswith("frozen."))


def test_a_tied_weight_is_cast_once_and_restored_once():
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head}).requires_grad_(False)
    stored = precision.store_frozen_weights_in_bf16(model)
    assert list(stored) == ["embed.weight"] and head.weight is embed.weight
    assert embed.weight.dtype == torch.bfloat16
    precision.restore_stored_dtypes(model, stored)
    assert head.weight is embed.weight and embed.weight.dtype == torch.float32
