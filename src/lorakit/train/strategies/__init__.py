"""Trainer strategies: training hooks (training_hooks.py) switched on by `train:` options.

| strategy | switched on by | runs | what it does |
|---|---|---|---|
| LoRA-drop (lora_drop.py) | `lora_drop_threshold` | adapter | ranks blocks by adapter output; the rest share one |
| ReLoRA (relora.py) | `relora_steps` | adapter | merges the adapter into W and restarts it every N steps |
| Delta-LoRA (delta_lora.py) | `delta_lora_lambda` | adapter | W also moves by lambda * (new - old adapter update) |
| LISA (lisa.py) | `lisa_activated_layers` | full | trains a random sample of blocks, drawn again every K steps |

Each is one small module with a `Strategy` subclass (base.py); docs/trainer-strategies.md is the user guide.
Hooks run in this order (LoRA-drop first: it restructures the adapter the others then work on).
"""

from __future__ import annotations

from lorakit.train.strategies.base import Strategy
from lorakit.train.strategies.delta_lora import DeltaLora
from lorakit.train.strategies.lisa import Lisa
from lorakit.train.strategies.lora_drop import LoraDrop
from lorakit.train.strategies.relora import ReLoRA

STRATEGIES: tuple[type[Strategy], ...] = (LoraDrop, ReLoRA, DeltaLora, Lisa)


def check_strategies(cfg) -> None:
    """Config validation (RunConfig.__post_init__): each strategy's options, and that it fits the run."""
    for strategy in STRATEGIES:
        strategy.check_config(cfg)


def strategy_hooks(model, cfg, run) -> list[Strategy]:
    """One hook per strategy switched on in cfg.train."""
    return [strategy(model, cfg, run) for strategy in STRATEGIES if strategy.enabled(cfg.train)]
