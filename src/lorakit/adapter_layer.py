"""What every adapter-bearing module shares: adapters keyed by name, activation, mixed-batch routing.

A method's layer wraps its base layer (`self.base_layer`, never subclassed) and keeps each adapter's
tensors in `nn.ModuleDict`/`nn.ParameterDict` attributes keyed by adapter name; the attribute names are
PEFT's (`lora_A`, `lora_B`, ...) so that parameter names, and thus adapter files, match PEFT's.

Additive methods (h = base(x) + delta(x)) implement three things: `add_adapter`, `delta_weight` (the
change to the base weight, for merging) and `adapter_output` (delta(x)). Routing rows of one batch to
different adapters, merging, unmerging and state handling are done here once for all of them. Methods
whose merge is not `W + delta` (DoRA, (IA)3) override `merge_weight` / `unmerge_weight`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

BASE_ADAPTER = "__base__"  # the row name that means "no adapter" in a mixed batch


class UnsupportedLayerError(TypeError, ValueError):
    """A targeted layer an adapter cannot wrap, or a variant it cannot run there. Both a TypeError (what lorakit
    raised first) and a ValueError (what PEFT raises), so code written against either library catches it."""


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 even on a half-precision base (PEFT's autocast_adapter_dtype default)."""
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype


class BatchRouting:
    """Which adapter each row of a batch uses: `names[i]` for row i (or `"__base__"`).

    generate() may repeat each row (beams, num_return_sequences), so a batch of k * len(names) rows is
    routed by repeating every name k times in place.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._cache: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}
        # what a layer may keep while this routing lasts (one mixed batch, or one generate() call), by its own
        # key: e.g. its adapters' weights gathered per row (methods/lora/mixed.py); dropped with the routing
        self.layer_state: dict = {}

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter name, LongTensor of row indices)] covering every row once."""
        key = (batch_size, device)
        if key not in self._cache:
            if batch_size % len(self.names):
                raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                                 f"{len(self.names)} and {batch_size} respectively (one adapter name per input row)")
            repeat = batch_size // len(self.names)
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
            self._cache[key] = [(n, torch.tensor(r, device=device)) for n, r in rows.items()]
        return self._cache[key]

    def row_names(self, batch_size: int) -> list[str]:
        """The adapter name of every row of a batch of `batch_size` rows (names repeated as groups() does)."""
        if batch_size % len(self.names):
            raise ValueError(f"adapter_names has {len(self.names)} entries but the batch has {batch_size} rows; "
                             "give one adapter name per input row")
        repeat = batch_size // len(self.names)
        return [name for name in self.names for _ in range(repeat)]


class AdapterHolder(nn.Module):
    """Bookkeeping shared by adapter layers and by trainable module copies (modules_to_save)."""

    # attributes holding one entry per adapter name, with trainable tensors (saved in adapter files)
    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    # attributes holding one entry per adapter name without saved tensors (dropout modules, ranks, ...)
    adapter_meta_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: BatchRouting | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_param_names[0]).keys())

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """PEFT's name for adapter_param_names."""
        return self.adapter_param_names

    @property
    def other_param_names(self) -> tuple[str, ...]:
        """PEFT's name for adapter_meta_names."""
        return self.adapter_meta_names

    def has_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_param_names[0])

    def delete_adapter(self, name: str) -> None:
        for attr in self.adapter_param_names + self.adapter_meta_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_requires_grad(self, name: str, flag: bool) -> None:
        for tensor in self.adapter_tensors(name).values():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(flag)

    def _adapter_entries(self, name: str):
        """(attribute, container, item) for each adapter container that holds adapter `name`."""
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                yield attr, container, container[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's saved tensors (the live parameters), keyed as in PEFT files relative to this module:
        `lora_A.weight`, `lora_embedding_A`, ..."""
        out = {}
        for attr, container, item in self._adapter_entries(name):
            if isinstance(item, nn.Parameter):
                out[attr] = item
            else:
                for key, tensor in item.state_dict(keep_vars=True).items():
                    out[f"{attr}.{key}"] = tensor
        return out

    def move_adapter(self, name: str, device: torch.device | str, empty: bool = False) -> None:
        """Put adapter `name`'s tensors on `device`; empty=True allocates them without copying values (to leave the
        meta device, where low_cpu_mem_usage puts adapters whose weights are loaded afterwards)."""
        for _, container, item in self._adapter_entries(name):
            if isinstance(item, nn.Parameter):
                data = torch.empty_like(item, device=device) if empty else item.data.to(device)
                container[name] = nn.Parameter(data, requires_grad=item.requires_grad)
            elif empty:
                item.to_empty(device=device)
            else:
                item.to(device)

    def _rows_by_adapter(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return self.routing.groups(x.shape[0], x.device)


class AdapterLayer(AdapterHolder):
    """Base of additive adapter layers: h = base_layer(x) + sum over active adapters of delta_a(x)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []

    # ---- what a method implements --------------------------------------------------------------
    def add_adapter(self, name: str, config, module_name: str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change this adapter makes to `base_layer.weight` (same shape, dtype and device)."""
        raise NotImplementedError

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """delta(x) for the rows in x; `base_out` is base_layer(x) for the same rows."""
        raise NotImplementedError

    def reset_adapter(self, name: str, config, module_name: str) -> None:
        """Re-initialise adapter `name` in place (the same tensor objects, so an optimizer keeps them), as
        add_adapter(name, config, module_name) initialised it. Trainer strategies that restart an adapter
        (ReLoRA) call it through `Tuner.reset_adapter`."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-initialise an adapter (no reset_adapter)")

    @classmethod
    def wrap_refusal(cls, base_layer: nn.Module) -> str | None:
        """None when this class can wrap `base_layer`; otherwise why not, although the base layer's type is one it
        is registered for (AdaLoRA on a grouped convolution). Completes "target module 'x' is a Conv2d, ...";
        `Tuner.layer_class_for` is None for such a layer, so the conformance suite skips it too."""
        return None

    def merge_refusal(self) -> str | None:
        """None when adapters can be folded into the base weight; otherwise why not (LoRA on a grouped
        convolution: its update is a full kernel, which the grouped kernel cannot hold)."""
        return None

    # ---- shared behaviour ----------------------------------------------------------------------
    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    # transformers code reads these on whatever module sits in the model (T5's feed-forward checks
    # `self.wo.weight.dtype` in forward), as PEFT's BaseTunerLayer provides them.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output for x (a layer may compute it on a faster kernel: LoraLinear)."""
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = self.base_forward(x, *args, **kwargs)
        if self.disabled:
            return base_out
        if self.routing is not None:
            return self._mixed_batch_forward(x, base_out)
        result = base_out
        for name in self.active_adapters:
            if name not in self.merged_adapters and self.has_adapter(name):
                result = result + self.adapter_output(name, x, base_out)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.merged_adapters:
            raise RuntimeError("Mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        result = base_out
        for name, rows in self._rows_by_adapter(x):
            if name == BASE_ADAPTER or not self.has_adapter(name):
                continue
            delta = self.adapter_output(name, x[rows], base_out[rows])
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    # ---- merging: W' = merge_weight(W); unmerge_weight(W') restores W (to fp32 tolerance) -----------------
    def merge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with adapter `name` folded in. Additive methods: W + delta_weight. Methods whose
        update depends on W (DoRA's norm) override, and cache what unmerge_weight needs."""
        return weight + self.delta_weight(name)

    def unmerge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of merge_weight."""
        return weight - self.delta_weight(name)

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor: the weight itself, or a dequantized copy for a quantized base
        layer (which provides `dequantized_weight()`)."""
        base = self.base_layer
        return base.dequantized_weight() if hasattr(base, "dequantized_weight") else base.weight

    def write_base_weight(self, weight: torch.Tensor) -> None:
        """Store a merged or unmerged weight into the base layer. A quantized base layer provides
        `store_dense_weight(weight)`, which returns the dense layer that takes its place (merging into 4 bits
        would lose precision), so from then on the base layer is dense."""
        base = self.base_layer
        if hasattr(base, "store_dense_weight"):
            self.base_layer = base.store_dense_weight(weight)
        else:
            with torch.no_grad():  # on the parameter itself, not `.data`: its version counter counts the write, which
                base.weight.copy_(weight)  # caches of the weight check (DoRA's base norms, methods/lora/dora.py)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """W <- merge_weight(W) for each named adapter this layer holds and has not merged yet."""
        if any(self.has_adapter(n) for n in names) and (reason := self.merge_refusal()):
            raise NotImplementedError(reason)
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            self.write_base_weight(self.merge_weight(name, self.dense_base_weight()))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merges in reverse order: W <- unmerge_weight(W)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.write_base_weight(self.unmerge_weight(name, self.dense_base_weight()))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge_adapter() before deleting it")
        super().delete_adapter(name)
