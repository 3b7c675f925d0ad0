"""LISA (train/strategies/lisa.py): gamma blocks train at a time, drawn again every K steps from the seed; frozen
blocks keep no optimizer state; everything outside the blocks always trains; a resume is exact."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit.train.hooks import RunContext
from lorakit.train.loop import run_training
from lorakit.train.strategies.lisa import Lisa
from tests.strategies.support import Spy, first_loss_and_last, four_block_llama, saved_model, spy_run, \
    straight_and_resumed
from tests.train_fixtures import one_torch_thread, tiny_run_config  # noqa: F401

FULL = ("finetuning_type=full", "adapter=null", "train.learning_rate=1e-3")
LISA = (*FULL, "train.max_steps=12", "train.lisa_activated_layers=2", "train.lisa_interval_steps=3")
OUTSIDE = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def watch(seen):
    def record(event, step, model, optimizer):
        params = dict(model.named_parameters())
        if event == "before_step":
            seen["before"] = {n: p.detach().clone() for n, p in params.items()}
        elif event == "after_step":
            changed = {n for n, p in params.items() if not torch.equal(p, seen["before"][n])}
            seen.setdefault("changed", {})[step] = changed
        elif event == "step_end":
            seen.setdefault("trainable", {})[step] = {n for n, p in params.items() if p.requires_grad}
            seen.setdefault("with_state", {})[step] = {n for n, p in params.items() if p in optimizer.state}
    return record


def test_blocks_train_in_seeded_draws_that_change_every_k_steps(tmp_path, monkeypatch):
    seen = {}
    _, hooks = spy_run(tmp_path, monkeypatch, Spy(watch(seen)), *LISA, model=four_block_llama(tmp_path))
    lisa = next(h for h in hooks if isinstance(h, Lisa))
    draws = [lisa.draw(period) for period in range(4)]
    assert all(len(d) == 2 for d in draws) and len({tuple(d) for d in draws}) > 1  # the set really changes
    for step in range(1, 13):
        expected = draws[(step - 1) // 3]
        changed = seen["changed"][step]
        assert {block_of(n) for n in changed} - {None} == set(expected), step
        assert set(OUTSIDE) <= changed  # embedding, final norm and head train at every step
        # after the step: the blocks of the next step's draw are trainable, the others frozen without state
        upcoming = draws[min(step, 11) // 3]
        for name in seen["trainable"][step] | seen["with_state"][step]:
            assert block_of(name) in (None, *upcoming), (step, name)
        assert set(OUTSIDE) <= seen["trainable"][step] and set(OUTSIDE) <= seen["with_state"][step]
        assert {block_of(n) for n in seen["trainable"][step]} - {None} == set(upcoming)


def test_the_draws_depend_on_the_seed_only(tmp_path):
    cfg = tiny_run_config(tmp_path, *LISA, model=four_block_llama(tmp_path))
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
    first, again = Lisa(model, cfg, RunContext()), Lisa(model, cfg, RunContext())
    other = Lisa(model, tiny_run_config(tmp_path, *LISA, "train.seed=7", model=four_block_llama(tmp_path)),
                 RunContext())
    assert [first.draw(p) for p in range(8)] == [again.draw(p) for p in range(8)]
    assert [first.draw(p) for p in range(8)] != [other.draw(p) for p in range(8)]


@pytest.mark.parametrize("stop_step", [4, 6])
def test_resume_is_bit_exact(tmp_path, monkeypatch, stop_step):
    """Stopped inside a period (4) and at a period boundary (6)."""
    straight_and_resumed(tmp_path, monkeypatch, stop_step, *LISA, "train.save_steps=2",
                         model=four_block_llama(tmp_path))
    straight, resumed = saved_model(tmp_path / "straight"), saved_model(tmp_path / "interrupted")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_lisa_trains_and_saves_a_whole_model(tmp_path):
    result = run_training(tiny_run_config(tmp_path, *FULL, "train.learning_rate=1e-2", "train.max_steps=30",
                                          "train.lr_scheduler=constant", "train.lisa_activated_layers=1",
                                          "train.lisa_interval_steps=4"), show_progress=False)
    first, last = first_loss_and_last(tmp_path / "run")
    assert last < 0.3 * first, (first, last)
    assert (tmp_path / "run" / "model" / "config.json").is_file() and not hasattr(result.model, "peft_config")


RUN_ERRORS = {
    "more blocks than the model has": (("train.lisa_activated_layers=3",),
                                       r"train.lisa_activated_layers=3 is more than the model's 2 transformer blocks; "
                                       r"choose 1..2"),
    "interval not shorter than the run": (("train.lisa_activated_layers=1", "train.lisa_interval_steps=4"),
                                          r"train.lisa_interval_steps=4 is not shorter than the run \(4 steps\)"),
}


@pytest.mark.parametrize("overrides, message", RUN_ERRORS.values(), ids=RUN_ERRORS.keys())
def test_settings_that_do_not_fit_the_model_or_run_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_training(tiny_run_config(tmp_path, *FULL, *overrides), show_progress=False)


def test_a_model_without_blocks_is_refused():
    cfg = SimpleNamespace(train=SimpleNamespace(lisa_activated_layers=1, lisa_interval_steps=2, seed=0))
    with pytest.raises(ValueError, match=r"LISA samples transformer blocks, but Linear has no list of blocks"):
        Lisa(nn.Linear(2, 2), cfg, RunContext())
