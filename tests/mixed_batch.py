"""The reference of a mixed-adapter batch (`adapter_names=`): every row run alone through its own adapter."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rows_run_alone(model, x: torch.Tensor, rows: list[str], after_switch: Callable[[], None] | None = None):
    """Row i of x through adapter rows[i] alone ("__base__": the base model), concatenated along the batch.
    after_switch runs after each set_adapter (e.g. to make every adapter trainable again for a gradient check)."""
    alone = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                alone.append(model(x[i:i + 1]))
        else:
            model.set_adapter(name)
            if after_switch is not None:
                after_switch()
            alone.append(model(x[i:i + 1]))
    return torch.cat(alone)
