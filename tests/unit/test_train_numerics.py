"""What one optimizer step computes: gradient accumulation, seeds, bf16 autocast, gradient checkpointing, and
one scheduler step per optimizer step."""

import math

import pytest
import torch

from lorakit.train import precision
from lorakit.train.config import TrainArgs
from lorakit.train.loop import run_training
from lorakit.train.optim import lr_factor
from tests.train_fixtures import (
    assert_same_tensors, metrics_records, tiny_run_config, train_losses, trained_weights, write_rows,
)
from tests.strategies.support import Spy, spy_run
from tests.train_fixtures import one_torch_thread  # noqa: F401  (an autouse fixture)


def train(tmp_path, output: str, *overrides: str, data=None):
    return run_training(tiny_run_config(tmp_path, *overrides, output=output, data=data), show_progress=False)


def varied_lengths(tmp_path) -> str:
    """20 records whose answers run from 1 to 40 characters: micro-batches hold very different token counts."""
    rows = [{"instruction": f"repeat {i}", "output": "ab" * (1 + (7 * i) % 20)} for i in range(20)]
    return write_rows(tmp_path / "varied.json", rows)


# fp32 (pinned): the exact path, where splitting changes only the summation order (1e-6). Under the default
# precision (bf16 where fast) the micro-batches' bf16 matmuls round differently from the big batch's: the same
# up to bf16 rounding, still far below the first step's loss difference a mean of micro-batch means would give.
@pytest.mark.parametrize("batch, accumulation, precision_overrides, weights_atol, loss_atol", [
    (4, 2, ("train.bf16=false",), 1e-6, 1e-6),
    (2, 4, ("train.bf16=false",), 1e-6, 1e-6),
    (2, 4, (), 2e-3, 5e-4),
], ids=["4x2-fp32", "2x4-fp32", "2x4-default-precision"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, batch, accumulation, precision_overrides,
                                                    weights_atol, loss_atol):
    """The loss of a step is the mean over every trained token of the global batch (not a mean of micro-batch
    means), so splitting a batch of 8 changes nothing. 20 records: the third batch holds only 4."""
    data = varied_lengths(tmp_path)
    big = train(tmp_path, "big", "train.batch_size=8", "train.max_steps=3", *precision_overrides, data=data)
    split = train(tmp_path, "split", f"train.batch_size={batch}", f"train.gradient_accumulation_steps={accumulation}",
                  "train.max_steps=3", *precision_overrides, data=data)
    assert_same_tensors(trained_weights(split.model), trained_weights(big.model), atol=weights_atol)
    assert train_losses(tmp_path / "split") == pytest.approx(train_losses(tmp_path / "big"), abs=loss_atol)


def test_the_same_seed_repeats_a_run_bit_for_bit_and_another_seed_does_not(tmp_path):
    dropout = "adapter.lora_dropout=0.2"
    first = train(tmp_path, "a", dropout, "train.seed=7")
    again = train(tmp_path, "b", dropout, "train.seed=7")
    other = train(tmp_path, "c", dropout, "train.seed=8")
    assert_same_tensors(trained_weights(again.model), trained_weights(first.model))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    a, c = trained_weights(first.model), trained_weights(other.model)
    assert all(not torch.equal(a[name], c[name]) for name in a if ".lora_A." in name)  # another initialisation


def frozen_dtypes_while_training(tmp_path, monkeypatch, output: str, *overrides: str):
    """(the run's result, {dtype of the frozen parameters}, {dtype of the trained ones}) seen at the first step."""
    seen = {}

    def record(event, step, model, optimizer):
        if event == "before_step" and not seen:
            seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
            seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}

    result, _ = spy_run(tmp_path, monkeypatch, Spy(record), *overrides, output=output)
    return result, seen["frozen"], seen["trained"]


def test_bf16_trains_with_fp32_trained_weights_bf16_frozen_ones_and_returns_the_model_in_its_dtype(tmp_path,
                                                                                                     monkeypatch):
    result, frozen, trained = frozen_dtypes_while_training(tmp_path, monkeypatch, "bf16", "train.bf16=true",
                                                           "train.max_steps=2", "data.val_size=4")
    train(tmp_path, "fp32", "train.bf16=false", "train.max_steps=2", "data.val_size=4")
    losses = train_losses(tmp_path / "bf16")
    assert all(math.isfinite(v) for v in losses.values()) and math.isfinite(result.metrics["loss"])
    # fp32 master weights for what trains; the frozen base weights are stored in bf16 (train/precision.py)
    assert (frozen, trained) == ({torch.bfloat16}, {torch.float32})
    # the returned model is back in the loaded dtype (fp32), holding the bf16 values it trained against
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    base = [p for n, p in result.model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in base)
    # so it runs without autocast, and merges in fp32 (to fp32 rounding of the unmerged model)
    ids = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = result.model.eval()(input_ids=ids).logits
        assert unmerged.dtype == torch.float32
        merged = result.model.merge_and_unload()
        assert {p.dtype for p in merged.parameters()} == {torch.float32}
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=0)
    # bf16 really computed something different from fp32, but close to it
    assert losses != train_losses(tmp_path / "fp32")
    assert losses[1] == pytest.approx(train_losses(tmp_path / "fp32")[1], rel=2e-2)


@pytest.mark.parametrize("fast", [False, True], ids=["no fast bf16: fp32", "fast bf16: bf16"])
def test_the_default_precision_is_auto_bf16_where_bf16_is_fast_and_fp32_elsewhere(tmp_path, monkeypatch, fast):
    """train.bf16 defaults to auto, which is bf16 where bf16 matmuls are fast and fp32 elsewhere (a CPU without
    AVX512-BF16/AMX, a GPU without bf16): forced both ways here, whatever this machine has."""
    assert TrainArgs().bf16 == "auto" and tiny_run_config(tmp_path).train.bf16 == "auto"
    monkeypatch.setattr(precision, "fast_bf16", lambda device: fast)
    _, frozen, trained = frozen_dtypes_while_training(tmp_path, monkeypatch, "default", "train.max_steps=2")
    assert (frozen, trained) == ({torch.bfloat16 if fast else torch.float32}, {torch.float32})
    train(tmp_path, "explicit", f"train.bf16={str(fast).lower()}", "train.max_steps=2")
    assert train_losses(tmp_path / "default") == train_losses(tmp_path / "explicit")  # bit for bit


def checkpointing_enabled(model) -> bool:
    base = model.get_base_model()
    # transformers 5.x renamed the property (the old name warns); support both
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(base, name))


def test_gradient_checkpointing_gives_the_same_losses_and_weights(tmp_path):
    plain = train(tmp_path, "plain", "train.max_steps=3")
    checkpointed = train(tmp_path, "ckpt", "train.max_steps=3", "train.gradient_checkpointing=true")
    assert checkpointing_enabled(checkpointed.model) and not checkpointing_enabled(plain.model)
    assert train_losses(tmp_path / "ckpt") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-5)
    assert_same_tensors(trained_weights(checkpointed.model), trained_weights(plain.model), atol=1e-5)


def test_one_scheduler_step_per_optimizer_step_with_accumulation(tmp_path):
    train(tmp_path, "run", "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=6",
          "train.warmup_steps=2", "train.lr_scheduler=linear", "train.learning_rate=1e-3")
    logged = {r["step"]: r["lr"] for r in metrics_records(tmp_path / "run") if "lr" in r}
    # the logged lr is the scheduler's value after step s, i.e. the factor at index s
    assert logged == {s: pytest.approx(1e-3 * lr_factor(s, 2, 6, "linear")) for s in range(1, 7)}
    assert logged[6] == 0.0
