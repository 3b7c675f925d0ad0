"""The method lifecycle (tuner.py, training_hooks.py): a method that overrides hooks gets them called by
the engine and the trainer, without either knowing the method's name.

The toy method here scales a Linear layer's output rows by a learned vector, h = l * (W x + b): a
non-additive merge (W' = diag(l) W, b' = l * b), like (IA)3. It is registered only inside these tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lorakit import PeftModel, get_peft_model
from lorakit.adapter_layer import AdapterLayer
from lorakit.config import PeftConfig, config_class_for
from lorakit.registry import METHODS, register_method
from lorakit.training_hooks import TrainingHook
from lorakit.tuner import WRAPS_LAYERS, Tuner
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.loop import run_training
from tests.train_fixtures import one_torch_thread, tiny_run_config  # noqa: F401


@dataclass
class ToyScaleConfig(PeftConfig):
    peft_type: str | None = "TOY_SCALE"
    target_modules: list[str] | str | None = None
    init_value: float = 1.0
    modules_to_save: list[str] | None = None
    exclude_modules: list[str] | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    penalty: float = 0.0  # weight of an extra loss term sum((l - 1)^2), added by a training hook


class ToyScaleLinear(AdapterLayer):
    adapter_param_names = ("toy_l",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.toy_l = nn.ParameterDict()
        self.merged_bias: dict[str, torch.Tensor] = {}

    def add_adapter(self, name, config, module_name) -> None:
        self.toy_l[name] = nn.Parameter(torch.full((self.base_layer.out_features,), float(config.init_value)))

    def adapter_output(self, name, x, base_out):
        return base_out * (self.toy_l[name] - 1)  # h = l * base_out, written as base_out + delta

    def merge_weight(self, name, weight):
        if self.base_layer.bias is not None:
            self.base_layer.bias.data *= self.toy_l[name].data
        return weight * self.toy_l[name].data[:, None]

    def unmerge_weight(self, name, weight):
        if self.base_layer.bias is not None:
            self.base_layer.bias.data /= self.toy_l[name].data
        return weight / self.toy_l[name].data[:, None]


class PenaltyHook(TrainingHook):
    name = "toy_penalty"

    def __init__(self, model_tuner: "ToyScaleTuner") -> None:
        self.tuner = model_tuner
        self.calls = {"extra_loss": 0, "before": [], "after": [], "end": []}

    def extra_loss(self, model):
        self.calls["extra_loss"] += 1
        params = [t for k, t in self.tuner.state_tensors().items()]
        return self.tuner.config.penalty * sum(((p - 1) ** 2).sum() for p in params)

    def before_optimizer_step(self, step):
        self.calls["before"].append(step)

    def after_optimizer_step(self, step):
        self.calls["after"].append(step)

    def on_step_end(self, step, optimizer):
        self.calls["end"].append(step)

    def state_dict(self):
        return {"ends": list(self.calls["end"]), "marker": torch.tensor([float(len(self.calls["end"]))])}

    def load_state_dict(self, state):
        self.calls["end"] = list(state["ends"])
        self.loaded_marker = state["marker"]


class ToyScaleTuner(Tuner):
    config_cls = ToyScaleConfig
    layers = {nn.Linear: ToyScaleLinear}
    # mergeable (non-additively), but rows of one batch may not use different adapters
    capabilities = frozenset({"mergeable", WRAPS_LAYERS})
    seen_inputs = 0

    def training_hooks(self):
        if not hasattr(self, "_hook"):
            self._hook = PenaltyHook(self)
        return [self._hook] if self.config.penalty else []

    def transform_inputs(self, kwargs):
        ToyScaleTuner.seen_inputs += 1
        return kwargs

    def transform_outputs(self, outputs, kwargs):
        return outputs * 1.0 if isinstance(outputs, torch.Tensor) else outputs

    @classmethod
    def sample_config(cls, target_modules, identity):
        return ToyScaleConfig(target_modules=target_modules, init_value=1.0 if identity else 1.5)


@pytest.fixture
def toy_method():
    register_method("toy_scale")(ToyScaleTuner)
    yield ToyScaleTuner
    for key in [k for k, v in METHODS.items() if v is ToyScaleTuner]:
        del METHODS[key]


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_config_classes_are_found_by_peft_type_without_the_registry():
    assert config_class_for("TOY_SCALE") is ToyScaleConfig
    assert config_class_for("lora").__name__ == "LoraConfig"
    with pytest.raises(ValueError, match="Unknown adapter method 'NOPE'"):
        config_class_for("NOPE")


def test_non_additive_merge_goes_through_merge_weight_and_unmerge_restores(toy_method):
    x = torch.randn(3, 8)
    model = get_peft_model(TwoLinear(), ToyScaleConfig(target_modules=["a", "b"], init_value=1.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "toy_l" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected)  # merged: l folded into W and b
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6)
    merged = model.merge_and_unload()
    assert type(merged) is TwoLinear
    torch.testing.assert_close(merged(x), expected)


def test_input_and_output_hooks_run_in_forward_and_not_when_disabled(toy_method):
    model = get_peft_model(TwoLinear(), ToyScaleConfig(target_modules=["a"]))
    before = ToyScaleTuner.seen_inputs
    model(torch.randn(2, 8))
    assert ToyScaleTuner.seen_inputs == before + 1
    with model.disable_adapter():
        model(torch.randn(2, 8))
    assert ToyScaleTuner.seen_inputs == before + 1


def test_capabilities_gate_mixed_batches_with_a_clear_error(toy_method):
    model = get_peft_model(TwoLinear(), ToyScaleConfig(target_modules=["a"])).eval()
    with pytest.raises(ValueError, match="mixed-adapter batches are not possible with toy_scale adapters"):
        model(torch.randn(2, 8), adapter_names=["default", "__base__"])


def test_a_method_without_merge_refuses_merging(toy_method, monkeypatch):
    monkeypatch.setattr(ToyScaleTuner, "capabilities", frozenset({WRAPS_LAYERS}))
    model = get_peft_model(TwoLinear(), ToyScaleConfig(target_modules=["a"]))
    with pytest.raises(ValueError, match="merges are not possible with toy_scale adapters"):
        model.merge_and_unload()


def test_trainer_calls_training_hooks_and_checkpoints_their_state(toy_method, tmp_path):
    cfg = tiny_run_config(tmp_path, "train.max_steps=3", "train.save_steps=3", "train.batch_size=4",
                          "train.gradient_accumulation_steps=2", "finetuning_type=adapter",
                          "adapter={method: toy_scale, target_modules: [q_proj, v_proj], penalty: 0.5}")
    result = run_training(cfg, show_progress=False)
    hook = result.model.tuners["default"].training_hooks()[0]
    assert hook.calls["extra_loss"] == 3 * 2  # every micro-batch of every step
    assert hook.calls["before"] == [0, 1, 2] and hook.calls["after"] == [1, 2, 3]
    assert hook.calls["end"] == [1, 2, 3]
    checkpoint = list_checkpoints(cfg.output_dir)[-1]
    resumed_cfg = tiny_run_config(tmp_path, "train.max_steps=4", "train.save_steps=3", "train.batch_size=4",
                                  "train.gradient_accumulation_steps=2", "finetuning_type=adapter",
                                  f"train.resume_from_checkpoint={checkpoint}",
                                  "adapter={method: toy_scale, target_modules: [q_proj, v_proj], penalty: 0.5}",
                                  output="resumed")
    resumed = run_training(resumed_cfg, show_progress=False)
    resumed_hook = resumed.model.tuners["default"].training_hooks()[0]
    assert resumed_hook.calls["end"] == [1, 2, 3, 4]  # the saved state came back, then one more step
    assert float(resumed_hook.loaded_marker) == 3.0


def test_penalty_pulls_the_scales_towards_one(toy_method, tmp_path):
    """The extra loss takes part in the gradient: a large penalty keeps l near its init of 1."""
    common = ("train.max_steps=4", "train.learning_rate=0.05", "finetuning_type=adapter")
    free = run_training(tiny_run_config(tmp_path, *common, "adapter={method: toy_scale, target_modules: [q_proj]}",
                                        output="free"), show_progress=False)
    held = run_training(tiny_run_config(tmp_path, *common, "adapter={method: toy_scale, target_modules: [q_proj], "
                                        "penalty: 100.0}", output="held"), show_progress=False)

    def drift(result):
        return sum(float((t.detach() - 1).abs().sum()) for t in result.model.tuners["default"].state_tensors().values())

    assert drift(held) < 0.5 * drift(free)


def test_loaded_adapter_of_a_custom_method_round_trips(toy_method, tmp_path):
    model = get_peft_model(TwoLinear(), ToyScaleConfig(target_modules=["a"], init_value=1.25))
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(TwoLinear(), str(tmp_path))
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), model(x))
