"""What every trainer strategy shares: its `train:` options, their validation, and the run it fits."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lorakit.training_hooks import TrainingHook


class Strategy(TrainingHook):
    """A TrainingHook configured by `train:` options. Subclasses set:

    options: the strategy's `train.` fields; the first switches it on (None = off).
    adapter_runs: True for strategies over an adapter (finetuning_type adapter), False for full fine-tuning.
    changes_base: True when it changes frozen base weights (then it cannot run on a sharded FSDP base).
    """

    title: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    adapter_runs: ClassVar[bool] = True
    changes_base: ClassVar[bool] = False

    def __init__(self, model, cfg, run) -> None:
        self.model, self.cfg, self.args, self.run = model, cfg, cfg.train, run

    @classmethod
    def enabled(cls, args) -> bool:
        return getattr(args, cls.options[0]) is not None

    @classmethod
    def check_config(cls, cfg) -> None:
        args, switch = cfg.train, cls.options[0]
        if not cls.enabled(args):
            defaults = {f.name: f.default for f in dataclasses.fields(args)}
            for name in cls.options[1:]:
                if getattr(args, name) != defaults[name]:
                    raise ValueError(f"train.{name}={getattr(args, name)!r} has no effect: {cls.title} is off; "
                                     f"switch it on with train.{switch}, or drop train.{name}")
            return
        cls.check_options(args)
        value = f"train.{switch}={getattr(args, switch)!r}"
        if cls.adapter_runs and not cfg.uses_adapter:
            raise ValueError(f"{value}: {cls.title} trains an adapter, but finetuning_type is "
                             f"{cfg.finetuning_type!r}; use finetuning_type adapter (with an adapter: section)")
        if not cls.adapter_runs and cfg.finetuning_type != "full":
            raise ValueError(f"{value}: {cls.title} trains the model's own weights, but finetuning_type is "
                             f"{cfg.finetuning_type!r}; use finetuning_type full")
        if cls.changes_base and args.distributed == "fsdp":
            raise ValueError(f"{value}: {cls.title} changes the base weights, which train.distributed=fsdp "
                             "shards; use train.distributed=ddp")

    @classmethod
    def check_options(cls, args) -> None:
        """Types and ranges of this strategy's options (ValueError naming field, value and what is allowed)."""


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"train.{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    """low <= value (< low when low_open) and value <= high."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, " + (f"{high}]" if high is not None else "inf)")
        raise ValueError(f"train.{name} must be in {interval}, got {value!r}")
