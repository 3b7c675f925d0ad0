"""LISA: layerwise importance sampling (Pan et al. 2024, https://arxiv.org/abs/2403.17919).

Full fine-tuning (finetuning_type full) in which, at any time, only gamma = `train.lisa_activated_layers` of
the model's transformer blocks train, together with everything outside the blocks (embeddings, the final
norm, the LM or classification head), which always trains. Every K = `train.lisa_interval_steps` steps a new
set of gamma blocks is drawn uniformly at random:

    period p = step // K;   active(p) = the first gamma of randperm(n_blocks, seed = train.seed, p)

Frozen blocks get no gradients and keep no optimizer state: their Adam moments are dropped when they freeze
and start from zero when they train again. Memory is that of training gamma blocks plus the outer layers.

The draw depends only on (seed, period), and the active set is checkpointed, so a resumed run draws the
same blocks. The blocks are the model's list of repeated layers (train/setup.py: transformer_blocks).
"""

from __future__ import annotations

import torch

from lorakit.train.setup import transformer_blocks
from lorakit.train.strategies.adapters import drop_optimizer_state
from lorakit.train.strategies.base import Strategy, check_int

SEED_STRIDE = 1_000_003  # (seed, period) -> one generator seed; a prime, so nearby seeds give distinct streams


class Lisa(Strategy):
    name = "lisa"
    title = "LISA"
    options = ("lisa_activated_layers", "lisa_interval_steps")
    adapter_runs = False

    @classmethod
    def check_options(cls, args) -> None:
        check_int("lisa_activated_layers", args.lisa_activated_layers, 1)
        check_int("lisa_interval_steps", args.lisa_interval_steps, 1)

    def __init__(self, model, cfg, run) -> None:
        super().__init__(model, cfg, run)
        try:
            self.blocks = transformer_blocks(model)
        except ValueError:
            raise ValueError(f"train.lisa_activated_layers: LISA samples transformer blocks, but "
                             f"{type(model).__name__} has no list of blocks; use plain finetuning_type full") from None
        self.gamma, self.interval = self.args.lisa_activated_layers, self.args.lisa_interval_steps
        if self.gamma > len(self.blocks):
            raise ValueError(f"train.lisa_activated_layers={self.gamma} is more than the model's "
                             f"{len(self.blocks)} transformer blocks; choose 1..{len(self.blocks)}")
        if run.world_size > 1:
            raise ValueError("train.lisa_activated_layers: LISA changes which parameters train during the run, "
                             "which DistributedDataParallel does not allow; train LISA on one process")
        self.total_steps: int | None = None
        self.active: list[int] = []
        self.period = -1

    def check_run(self, total_steps: int) -> None:
        if self.interval >= total_steps:
            raise ValueError(f"train.lisa_interval_steps={self.interval} is not shorter than the run "
                             f"({total_steps} steps), so the blocks would never be drawn again; choose a value "
                             f"< {total_steps}")
        self.total_steps = total_steps

    def draw(self, period: int) -> list[int]:
        """The blocks that train in `period` (sorted indices)."""
        generator = torch.Generator().manual_seed(self.args.seed * SEED_STRIDE + period)
        return sorted(torch.randperm(len(self.blocks), generator=generator)[:self.gamma].tolist())

    def on_train_start(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        period = step // self.interval
        # a resumed run keeps the checkpoint's draw for the current period
        self.activate(self.active if self.period == period else self.draw(period), period, optimizer)

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if step % self.interval == 0 and step < self.total_steps:
            period = step // self.interval
            self.activate(self.draw(period), period, optimizer)

    def activate(self, active: list[int], period: int, optimizer: torch.optim.Optimizer) -> None:
        for index, block in enumerate(self.blocks):
            params = list(block.parameters())
            for param in params:
                param.requires_grad_(index in active)
            if index not in active:
                drop_optimizer_state(optimizer, params)
        self.active, self.period = list(active), period

    def state_dict(self) -> dict:
        return {"period": self.period, "active": self.active}

    def load_state_dict(self, state: dict) -> None:
        self.period, self.active = int(state.get("period", -1)), [int(i) for i in state.get("active", [])]
