"""Delta-LoRA (train/strategies/delta_lora.py): after every optimizer step from the start step on, W moves by
lambda * (s B'A' - s B A); a resume is exact; the result is the merged model."""

import pytest
import torch

from lorakit.adapter_layer import AdapterLayer
from lorakit.train.loop import run_training
from tests.strategies.support import LEARNS, Spy, first_loss_and_last, saved_model, spy_run, straight_and_resumed
from tests.train_fixtures import one_torch_thread, tiny_run_config  # noqa: F401

DELTA = ("train.max_steps=6", "train.delta_lora_lambda=0.5", "train.delta_lora_start_step=2")


def weights_and_updates(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (W, s B A) of every LoRA layer."""
    return {path: (m.base_layer.weight.detach().clone(), m.delta_weight("default").detach().clone())
            for path, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}


def test_w_moves_by_lambda_times_the_change_of_the_update(tmp_path, monkeypatch):
    seen = {}

    def record(event, step, model, optimizer):
        if event in ("before_step", "after_step"):
            seen[(event, step)] = weights_and_updates(model)

    spy_run(tmp_path, monkeypatch, Spy(record), *DELTA)
    for done in range(6):  # before_optimizer_step(done), after_optimizer_step(done + 1)
        before, after = seen[("before_step", done)], seen[("after_step", done + 1)]
        for path, (w, update) in before.items():
            w_new, update_new = after[path]
            assert not torch.equal(update_new, update)  # the adapter trained
            if done < 2:  # before delta_lora_start_step: W frozen
                assert torch.equal(w_new, w), (done, path)
            else:
                expected = 0.5 * (update_new - update)
                torch.testing.assert_close(w_new - w, expected, rtol=1e-4, atol=1e-7)
                assert expected.abs().max() > 1e-5  # a real move, not a rounding error


@pytest.mark.parametrize("stop_step", [1, 4])
def test_resume_is_bit_exact(tmp_path, monkeypatch, stop_step):
    straight_and_resumed(tmp_path, monkeypatch, stop_step, *DELTA, "train.save_steps=2", "train.warmup_steps=1")
    straight, resumed = saved_model(tmp_path / "straight"), saved_model(tmp_path / "interrupted")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_delta_lora_trains_and_saves_the_merged_model(tmp_path):
    plain = run_training(tiny_run_config(tmp_path, "train.max_steps=30", *LEARNS, output="plain"),
                         show_progress=False)
    delta = run_training(tiny_run_config(tmp_path, "train.max_steps=30", "train.delta_lora_lambda=0.5", *LEARNS),
                         show_progress=False)
    first, last = first_loss_and_last(tmp_path / "run")
    assert last < 0.3 * first, (first, last)
    assert (tmp_path / "run" / "model" / "config.json").is_file() and not (tmp_path / "run" / "adapter").exists()
    assert delta.train_loss != plain.train_loss  # W's own updates changed the run


def test_a_start_step_after_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train.delta_lora_start_step=6 is not before the end of the run "
                                         r"\(6 steps\)"):
        run_training(tiny_run_config(tmp_path, "train.max_steps=6", "train.delta_lora_lambda=0.5",
                                     "train.delta_lora_start_step=6"), show_progress=False)
