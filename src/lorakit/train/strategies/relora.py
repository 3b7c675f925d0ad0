"""ReLoRA: high-rank training through low-rank updates (Lialin et al. 2023, https://arxiv.org/abs/2307.05695).

The adapter trains as usual; after every N = `train.relora_steps` optimizer steps (never after the last):

    W <- merge_weight(W)       the adapter's update folded into the frozen base (LoRA: W + s B A), through the
                               layers' merge machinery, so any mergeable method works
    adapter <- its init        Tuner.reset_adapter (LoRA: A Kaiming-uniform, B = 0: the model is unchanged)
    Adam moments of the adapter: the `relora_prune_ratio` share of entries set to 0 (1.0 = reset), those where
                               the first moment is smallest (the same entries of both moments)
    learning rate              lr(t) = f(t) * (t - kN + 1) / (w + 1)  for kN <= t < kN + w, k >= 1

f is the run's schedule (warm-up, cosine, ...) and w = `relora_warmup_steps`: the "jagged" schedule, a
short warm-up after each restart. Each update has rank r, but their sum has rank up to (restarts + 1) r.

The base weights change, so every checkpoint saves them (`changed_base_parameters`) and the run's result is
the merged model in output_dir/model (the adapter alone no longer reproduces it).
"""

from __future__ import annotations

import math

import torch

from lorakit.train.strategies.adapters import (
    active_tuners, adapter_layers, adapter_parameters, base_weight_names, check_dense_base, peft_model,
    prune_optimizer_state, require_mergeable, require_resettable,
)
from lorakit.train.strategies.base import Strategy, check_int, check_number


class ReLoRA(Strategy):
    name = "relora"
    title = "ReLoRA"
    options = ("relora_steps", "relora_warmup_steps", "relora_prune_ratio")
    adapter_runs = True
    changes_base = True

    @classmethod
    def check_options(cls, args) -> None:
        check_int("relora_steps", args.relora_steps, 1)
        if args.relora_warmup_steps is not None:
            check_int("relora_warmup_steps", args.relora_warmup_steps, 0)
            if args.relora_warmup_steps >= args.relora_steps:
                raise ValueError(f"train.relora_warmup_steps={args.relora_warmup_steps} must be shorter than "
                                 f"train.relora_steps={args.relora_steps} (the warm-up after each restart)")
        check_number("relora_prune_ratio", args.relora_prune_ratio, 0.0, 1.0)

    def __init__(self, model, cfg, run) -> None:
        super().__init__(model, cfg, run)
        self.model = peft_model(model, self.title)
        self.period = self.args.relora_steps
        warmup = self.args.relora_warmup_steps
        self.warmup = math.ceil(0.05 * self.period) if warmup is None else warmup
        self.prune_ratio = self.args.relora_prune_ratio
        self.total_steps: int | None = None
        self.restarts = 0

    def setup(self, model) -> None:
        require_mergeable(self.model, self.title, "it merges the adapter into the base weights")
        require_resettable(self.model, self.title)
        self.layers = adapter_layers(self.model)
        check_dense_base(self.layers, self.title)

    def changed_base_parameters(self) -> list[str]:
        return base_weight_names(self.model, self.layers)

    def check_run(self, total_steps: int) -> None:
        if self.period >= total_steps:
            raise ValueError(f"train.relora_steps={self.period} is not shorter than the run ({total_steps} steps), "
                             f"so no restart would happen; choose relora_steps < {total_steps}")
        self.total_steps = total_steps

    def is_restart(self, step: int) -> bool:
        """True when the adapter is merged and restarted after optimizer step `step` (1-based)."""
        return step % self.period == 0 and step < self.total_steps

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.is_restart(step):
            self.restart(optimizer)

    @torch.no_grad()
    def restart(self, optimizer: torch.optim.Optimizer) -> None:
        for _, layer, name in self.layers:
            layer.write_base_weight(layer.merge_weight(name, layer.dense_base_weight()))
        for tuner in active_tuners(self.model):
            tuner.reset_adapter()
        prune_optimizer_state(optimizer, adapter_parameters(self.layers), self.prune_ratio)
        self.restarts += 1

    def lr_factor(self, step: int, factor: float) -> float:
        since_restart = step % self.period
        if step < self.period or since_restart >= self.warmup:
            return factor
        return factor * (since_restart + 1) / (self.warmup + 1)

    def state_dict(self) -> dict:
        return {"restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.restarts = int(state.get("restarts", 0))
