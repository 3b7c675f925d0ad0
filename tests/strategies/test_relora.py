"""ReLoRA (train/strategies/relora.py): at each restart the base weights change by exactly the merged update,
the adapter is re-initialised, its optimizer state pruned, and the learning rate restarts; a resume across a
restart is bit-exact; the result is the merged model, usable by `lorakit eval/generate`."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.adapter_layer import AdapterLayer
from lorakit.methods.lora.tuner import LoraTuner
from lorakit.train import precision
from lorakit.train.loop import run_training
from lorakit.train.optim import build_scheduler, lr_factor
from lorakit.train.strategies.adapters import keep_largest
from lorakit.train.strategies.relora import ReLoRA
from lorakit.tuner import MERGEABLE
from tests.integration.cli_support import run_cli
from tests.strategies.support import LEARNS, Spy, first_loss_and_last, saved_model, spy_run, straight_and_resumed
from tests.train_fixtures import checkpoint_weights, one_torch_thread, tiny_run_config, write_rows  # noqa: F401

RELORA = ("train.max_steps=9", "train.relora_steps=3", "train.relora_warmup_steps=1")


def layers_of(model):
    return [(path, m) for path, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)]


def snapshot(model, optimizer) -> dict:
    """Base weights, adapter tensors, merged updates and Adam moments of every LoRA layer."""
    out = {}
    for path, layer in layers_of(model):
        out[path] = {
            "W": layer.base_layer.weight.detach().clone(),
            "delta": layer.delta_weight("default").detach().clone(),
            "A": layer.lora_A["default"].weight.detach().clone(),
            "B": layer.lora_B["default"].weight.detach().clone(),
            "moments": {k: v.clone() for k, v in optimizer.state[layer.lora_A["default"].weight].items()},
        }
    return out


def test_each_restart_merges_reinitialises_and_prunes(tmp_path, monkeypatch):
    seen = {}

    def record(event, step, model, optimizer):
        if event in ("after_step", "step_end"):
            seen[(event, step)] = snapshot(model, optimizer)

    result, hooks = spy_run(tmp_path, monkeypatch, Spy(record), *RELORA, "train.relora_prune_ratio=0.75")
    for step in range(1, 10):
        before, after = seen[("after_step", step)], seen[("step_end", step)]
        restart = step in (3, 6)  # not after the last step (9)
        for path in before:
            b, a = before[path], after[path]
            if not restart:
                assert torch.equal(a["W"], b["W"]) and torch.equal(a["A"], b["A"]), (step, path)
                continue
            # the base moved by exactly the merged update s B A
            assert torch.equal(a["W"], b["W"] + b["delta"]), (step, path)
            assert not torch.equal(b["delta"], torch.zeros_like(b["delta"]))
            # A drawn again (Kaiming-uniform, bound 1/sqrt(d_in)), B = 0: the adapter's update is 0 again
            assert not torch.equal(a["A"], b["A"])
            assert a["A"].abs().max() <= 1 / math.sqrt(a["A"].shape[1])
            assert torch.equal(a["B"], torch.zeros_like(a["B"]))
            # Adam moments: the 75% of entries with the smallest first moment zeroed in both moments, the others
            # unchanged, the step count kept
            old_m, new_m = b["moments"]["exp_avg"], a["moments"]["exp_avg"]
            kept = new_m != 0
            assert int((~kept).sum()) == math.floor(0.75 * old_m.numel())
            assert old_m[~kept].abs().max() <= old_m[kept].abs().min()
            for key in ("exp_avg", "exp_avg_sq"):
                old, new = b["moments"][key], a["moments"][key]
                assert torch.equal(new[kept], old[kept]) and not new[~kept].any()
            assert torch.equal(a["moments"]["step"], b["moments"]["step"])
    relora = next(h for h in hooks if isinstance(h, ReLoRA))
    assert relora.restarts == 2


@pytest.mark.parametrize("precision_override", ["train.bf16=false", None], ids=["fp32", "default precision"])
def test_a_restart_leaves_the_model_function_unchanged(tmp_path, monkeypatch, precision_override):
    """After merge + re-init (B = 0), the model computes what it computed just before the restart: to fp32
    rounding on the exact path; to bf16 rounding under the default precision (bf16 where fast), whose frozen
    weights are bf16 but whose merged-into base weights stay fp32. The model is run as the run computes
    (under its autocast); the adapter's own effect is far larger than either tolerance."""
    overrides = (precision_override,) if precision_override else ()
    bf16 = precision.resolve_bf16(tiny_run_config(tmp_path, *overrides).train.bf16, torch.device("cpu"))
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, dtypes = {}, {}

    def record(event, step, model, optimizer):
        if step == 3 and event in ("after_step", "step_end"):
            with torch.no_grad(), precision.autocast(torch.device("cpu"), bf16):
                logits[event] = model(input_ids=ids).logits.float()
                if event == "after_step":
                    with model.disable_adapter():
                        logits["without the adapter"] = model(input_ids=ids).logits.float()
                    # the weights ReLoRA merges into stay fp32; the other frozen ones are stored in bf16
                    dtypes["merged into"] = {layer.base_layer.weight.dtype for _, layer in layers_of(model)}
                    dtypes["embedding"] = model.get_input_embeddings().weight.dtype

    result, _ = spy_run(tmp_path, monkeypatch, Spy(record), *RELORA, *overrides)
    assert dtypes == {"merged into": {torch.float32}, "embedding": torch.bfloat16 if bf16 else torch.float32}
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}  # the merged model, in its dtype
    before = logits["after_step"]
    atol = 2 ** -6 * float(before.abs().max()) if bf16 else 1e-5
    torch.testing.assert_close(logits["step_end"], before, rtol=0, atol=atol)
    assert (before - logits["without the adapter"]).abs().max() > 10 * atol


def test_keep_largest_masks_exactly_the_share_asked():
    values = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    assert torch.equal(keep_largest(values, 0.5), torch.tensor([[False, True, False], [True, False, True]]))
    for ratio, zeros in ((0.0, 0), (0.999, 5), (1.0, 6)):
        assert int((~keep_largest(values, ratio)).sum()) == zeros


def test_learning_rate_restarts_with_a_short_warm_up(tmp_path):
    """The jagged schedule: the run's schedule times a linear ramp over the warm-up steps after each restart."""
    cfg = tiny_run_config(tmp_path, "train.max_steps=12", "train.relora_steps=4", "train.relora_warmup_steps=2",
                          "train.warmup_steps=1", "train.lr_scheduler=cosine")
    hook = ReLoRA.__new__(ReLoRA)
    hook.period, hook.warmup = 4, 2
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.learning_rate)
    scheduler = build_scheduler(optimizer, cfg.train, 12, [hook])
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = cfg.train.learning_rate
    envelope = [peak * lr_factor(t, 1, 12, "cosine") for t in range(12)]
    ramp = {4: 1 / 3, 5: 2 / 3, 8: 1 / 3, 9: 2 / 3}  # steps 4-5 and 8-9 follow the restarts after steps 4 and 8
    expected = [envelope[t] * ramp.get(t, 1.0) for t in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[4] < lrs[3] and lrs[8] < lrs[7]  # the drop at each restart


def test_checkpoints_hold_the_moved_base_weights(tmp_path):
    run_training(tiny_run_config(tmp_path, *RELORA, "train.save_steps=1", "train.save_total_limit=null"),
                 show_progress=False)
    saved = {step: checkpoint_weights(tmp_path / "run" / f"checkpoint-{step}") for step in range(1, 10)}
    base = sorted(k for k in saved[1] if k.endswith("base_layer.weight"))
    assert base and all(".lora_" not in k for k in base)
    for step in range(2, 10):
        moved = any(not torch.equal(saved[step][k], saved[step - 1][k]) for k in base)
        assert moved == (step in (3, 6)), step
        if step in (3, 6):
            assert all(not saved[step][k].any() for k in saved[step] if ".lora_B." in k)


@pytest.mark.parametrize("stop_step", [2, 3, 4])
def test_resume_across_a_restart_is_bit_exact(tmp_path, monkeypatch, stop_step):
    """Stopped just before (2), right after (3) and just after (4) the first restart; dropout on."""
    settings = (*RELORA, "train.save_steps=1", "adapter.lora_dropout=0.1", "train.relora_prune_ratio=0.9")
    straight_and_resumed(tmp_path, monkeypatch, stop_step, *settings)
    straight, resumed = saved_model(tmp_path / "straight"), saved_model(tmp_path / "interrupted")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_the_result_is_the_merged_model_and_the_cli_uses_it(tmp_path, capsys):
    data = write_rows(tmp_path / "train.jsonl", [{"instruction": f"add {i} and 1", "input": "",
                                                  "output": str(i + 1)} for i in range(16)])
    result = run_training(tiny_run_config(tmp_path, *RELORA, data=data), show_progress=False)
    run_dir = tmp_path / "run"
    assert (run_dir / "model" / "config.json").is_file() and not (run_dir / "adapter").exists()
    assert not isinstance(result.model, PeftModel)  # the merged transformers model
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    ids = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    # the base moved: the original model differs
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert not torch.allclose(original(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)
    code, out, _ = run_cli(capsys, "generate", "--model", run_dir, "--prompt", "add 2 and 1", "--max-new-tokens", 3)
    assert code == 0 and out.strip()
    code, out, _ = run_cli(capsys, "eval", "--model", run_dir / "model", "--data", data, "--no-generate")
    assert code == 0 and "loss" in out
    code, _, err = run_cli(capsys, "eval", "--adapter", run_dir, "--data", data)
    assert code != 0 and "--model" in err and "whole model" in err


def test_relora_trains(tmp_path):
    """A tiny convergence check: the loss keeps falling across three restarts."""
    run_training(tiny_run_config(tmp_path, "train.max_steps=30", "train.relora_steps=8", "train.relora_warmup_steps=2",
                                 *LEARNS), show_progress=False)
    first, last = first_loss_and_last(tmp_path / "run")
    assert last < 0.45 * first, (first, last)


def test_a_method_that_cannot_merge_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(LoraTuner, "capabilities", LoraTuner.capabilities - {MERGEABLE})
    with pytest.raises(ValueError, match=r"ReLoRA needs a mergeable adapter method .*lora adapters are not"):
        run_training(tiny_run_config(tmp_path, *RELORA), show_progress=False)


def test_a_period_not_shorter_than_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train.relora_steps=9 is not shorter than the run \(9 steps\).*< 9"):
        run_training(tiny_run_config(tmp_path, "train.max_steps=9", "train.relora_steps=9"), show_progress=False)
