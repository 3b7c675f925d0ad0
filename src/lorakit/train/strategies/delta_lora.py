"""Delta-LoRA: the frozen weight follows the adapter's change (Zi et al. 2023, https://arxiv.org/abs/2309.02411).

Besides the usual optimizer step on A and B, every step t >= `train.delta_lora_start_step` also moves W:

    W_{t+1} = W_t + lambda * (s B_{t+1} A_{t+1} - s B_t A_t)        lambda = `train.delta_lora_lambda`

The layers' `delta_weight` gives s B A, so any additive method works: `before_optimizer_step` records it for
each layer (one tensor of W's size per layer), `after_optimizer_step` applies the difference. W receives
the adapter's update direction without storing gradients or optimizer state for W. The paper also drops
the adapter's dropout (lora_dropout: 0), so that the update follows the gradient of W exactly.

The base weights change, so checkpoints save them (`changed_base_parameters`) and the run's result is the
merged model in output_dir/model.
"""

from __future__ import annotations

import torch

from lorakit.train.strategies.adapters import (
    adapter_layers, base_weight_names, check_dense_base, peft_model, require_mergeable,
)
from lorakit.train.strategies.base import Strategy, check_int, check_number


class DeltaLora(Strategy):
    name = "delta_lora"
    title = "Delta-LoRA"
    options = ("delta_lora_lambda", "delta_lora_start_step")
    adapter_runs = True
    changes_base = True

    @classmethod
    def check_options(cls, args) -> None:
        check_number("delta_lora_lambda", args.delta_lora_lambda, 0.0)
        check_int("delta_lora_start_step", args.delta_lora_start_step, 0)

    def __init__(self, model, cfg, run) -> None:
        super().__init__(model, cfg, run)
        self.model = peft_model(model, self.title)
        self.scale = float(self.args.delta_lora_lambda)
        self.start = self.args.delta_lora_start_step
        self.recorded: list[torch.Tensor] = []

    def setup(self, model) -> None:
        require_mergeable(self.model, self.title, "it moves W by the change of the adapter's weight update")
        self.layers = adapter_layers(self.model)
        check_dense_base(self.layers, self.title)
        for path, layer, name in self.layers:
            try:
                layer.delta_weight(name)
            except NotImplementedError:
                raise ValueError(f"{self.title} needs the adapter's weight update (delta_weight); the "
                                 f"{type(layer).__name__} at {path} has none") from None

    def changed_base_parameters(self) -> list[str]:
        return base_weight_names(self.model, self.layers)

    def check_run(self, total_steps: int) -> None:
        if self.start >= total_steps:
            raise ValueError(f"train.delta_lora_start_step={self.start} is not before the end of the run "
                             f"({total_steps} steps), so W would never move; choose a value < {total_steps}")

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        self.recorded = [layer.delta_weight(name) for _, layer, name in self.layers] if step >= self.start else []

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for (_, layer, name), old in zip(self.layers, self.recorded):
            change = (layer.delta_weight(name) - old) * self.scale
            layer.write_base_weight(layer.dense_base_weight() + change)
        self.recorded = []
