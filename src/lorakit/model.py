"""PeftModel: a transformers model with named adapters injected; save/load, merge, switching.

The structure mirrors HuggingFace PEFT (`peft_model.base_model.model` is the transformers model), so
parameter names, and therefore adapter files, are the same in both libraries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import torch
from torch import nn

from lorakit.adapter_files import (
    read_adapter_config,
    read_adapter_weights,
    resolve_adapter_dir,
    write_adapter,
)
from lorakit.adapter_layer import BASE_ADAPTER, AdapterHolder, AdapterLayer, BatchRouting
from lorakit.config import PeftConfig
from lorakit.integrations.hub import push_adapter
from lorakit.integrations.model_card import facts_from_model, training_info_from_run, write_model_card
from lorakit.integrations.signature import forward_with_model_signature
from lorakit.modules_to_save import ModulesToSaveWrapper
from lorakit.registry import method_for_config
from lorakit.state import adapter_holders, detached_copies, load_adapter_state_dict
from lorakit.tasks import SEQ_CLS_HEAD_NAMES
from lorakit.training_hooks import TrainingHook
from lorakit.tuner import MERGEABLE, MIXED_BATCH, Tuner

DEFAULT_ADAPTER = "default"


class TunerModel(nn.Module):
    """Holds the transformers model as `.model`, so parameter names read `base_model.model.<path>`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A model with adapters. Build with `get_peft_model(model, config)` or `PeftModel.from_pretrained`."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("this model already has adapters; use add_adapter() / load_adapter() on it")
        self.base_model = TunerModel(model)
        self.tuners: dict[str, Tuner] = {}  # adapter name -> its method's lifecycle object (tuner.py)
        self._active: list[str] = []
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)
        self.train(model.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter name -> its config. The tuners hold the configs, since a method may update its own during
        training (AdaLoRA records the rank pattern it allocated), and a save writes the current one."""
        return {name: tuner.config for name, tuner in self.tuners.items()}

    # ---- running ---------------------------------------------------------------------------------
    @forward_with_model_signature  # trainers see the wrapped model's inputs and labels (integrations/signature.py)
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward. adapter_names: one adapter name (or "__base__") per input row."""
        tuners = self._running_tuners()
        for tuner in tuners:
            kwargs = tuner.transform_inputs(kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            outputs = self.base_model(*args, **kwargs)
        for tuner in reversed(tuners):
            outputs = tuner.transform_outputs(outputs, kwargs)
        return outputs

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's generate, optionally with one adapter per row (see forward)."""
        for tuner in self._running_tuners():
            kwargs = tuner.transform_inputs(kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.get_base_model().generate(*args, **kwargs)

    def _running_tuners(self) -> list[Tuner]:
        """The active adapters' tuners, unless the adapters are disabled (disable_adapter())."""
        return [] if self._disabled else [self.tuners[n] for n in self._active]

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names, args, kwargs):
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list of adapter names, one per input row")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {sorted(self.peft_config)} "
                             f"(or {BASE_ADAPTER!r} for the base model)")
        self._require(MIXED_BATCH, {n for n in adapter_names if n != BASE_ADAPTER}, "mixed-adapter batches")
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
        holders = [holder for _, holder in self._holders()]
        if any(isinstance(m, AdapterLayer) and m.merged_adapters for m in holders):
            raise RuntimeError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        routing = BatchRouting(list(adapter_names))
        for holder in holders:
            holder.routing = routing
        try:
            yield
        finally:
            for holder in holders:
                holder.routing = None

    # ---- adapters by name ------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter (inactive until set_adapter) with its method's standard init."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete_adapter({adapter_name!r}) "
                             "first or choose another name")
        method = method_for_config(peft_config)
        other_types = {c.peft_type for c in self.peft_config.values()} - {peft_config.peft_type}
        if other_types:
            raise ValueError(f"this model holds {sorted(other_types)} adapters; one PeftModel holds adapters of one "
                             f"method, so a {peft_config.peft_type} adapter cannot be added")
        if peft_config.task_type == "SEQ_CLS" and hasattr(peft_config, "modules_to_save"):
            # train the new classification head in full, as PEFT does (PEFT's files may list a head twice)
            heads = list(dict.fromkeys(peft_config.modules_to_save or []))
            peft_config = dataclasses.replace(peft_config, modules_to_save=heads + [
                h for h in SEQ_CLS_HEAD_NAMES if h not in heads])
        tuner = method(self.base_model, peft_config, adapter_name)
        try:
            tuner.prepare()
            tuner.inject()
            tuner.after_inject()
        except Exception:
            self._remove_from_layers(adapter_name)
            tuner.remove()
            raise
        self.tuners[adapter_name] = tuner
        self._apply_active()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapter(s) active (their outputs add up); only active adapters are trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ValueError(f"no adapter named {missing or names!r}; this model has {sorted(self.peft_config)}")
        self._active = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r} to delete; this model has {sorted(self.peft_config)}")
        if adapter_name in self._active:
            raise ValueError(f"adapter {adapter_name!r} is active; set_adapter() to another adapter before deleting it")
        self._forget(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add `adapter_name` as a weighted combination of existing adapters (PEFT's signature and combination
        types: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd,
        magnitude_prune, magnitude_prune_svd). The new adapter is inactive until set_adapter, and saves, loads
        and deletes like any other. The adapters' method does the arithmetic (Tuner.combine_adapters)."""
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"no adapter named {missing}; this model has {sorted(self.peft_config)}")
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"adapters lists an adapter twice: {list(adapters)}; give each once with its weight")
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(adapters):
            raise ValueError(f"weights must give one number per adapter ({len(adapters)}), got {weights!r}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ValueError(f"weights must be numbers, got {list(weights)!r}")
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete_adapter({adapter_name!r}) "
                             "first or choose another name")
        method = type(self.tuners[adapters[0]])
        try:
            method.combine_adapters(self, list(adapters), [float(w) for w in weights], adapter_name,
                                    combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                                    svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                                    majority_sign_method=majority_sign_method)
        except Exception:
            if adapter_name in self.peft_config:
                self._forget(adapter_name)
            raise

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active), as in PEFT."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self._active[0]]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this block (merged adapters are unmerged, then merged back)."""
        holders = self._holders()
        merged = {path: list(m.merged_adapters) for path, m in holders if isinstance(m, AdapterLayer)}
        self.unmerge_adapter()
        for _, holder in holders:
            holder.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for path, holder in holders:
                holder.disabled = False
                if merged.get(path):
                    holder.merge(merged[path])

    _disabled = False  # inside disable_adapter(): no tuner rewrites inputs or outputs
    # How the adapter was trained, for its model card (integrations/model_card.py): set by from_pretrained for a
    # `lorakit train` run's adapter and by the Trainer integration; None: unknown.
    training_info = None

    def _holders(self) -> list[tuple[str, AdapterHolder]]:
        return adapter_holders(self.get_base_model())

    def _apply_active(self) -> None:
        """Push the active list to every layer and make exactly the active adapters' tensors trainable."""
        for _, holder in self._holders():
            holder.active_adapters = list(self._active)
        for param in self.parameters():  # also tensors tuners keep outside the model (on base_model)
            param.requires_grad_(False)
        for name in self._active:
            if not self.peft_config[name].inference_mode:
                self.tuners[name].set_trainable(True)

    def _forget(self, adapter_name: str) -> None:
        """Remove an adapter entirely: from the layers, its tuner's own state, and the bookkeeping."""
        self._remove_from_layers(adapter_name)
        self.tuners.pop(adapter_name).remove()

    def _require(self, capability: str, adapter_names, what: str) -> None:
        """Refuse `what` for adapters whose method lacks `capability` (tuner.py)."""
        lacking = sorted({self.tuners[n].name for n in adapter_names if capability not in self.tuners[n].capabilities})
        if lacking:
            raise ValueError(f"{what} are not possible with {', '.join(lacking)} adapters (their method is not "
                             f"{capability.replace('_', '-')}); see docs/architecture.md")

    def _remove_from_layers(self, adapter_name: str) -> None:
        """Delete the adapter from every layer; layers left without adapters go back to their base module."""
        model = self.get_base_model()
        for path, holder in reversed(self._holders()):  # innermost first: nested layers (MHA's out_proj) unwrap cleanly
            holder.delete_adapter(adapter_name)
            if not holder.adapter_names:
                model.set_submodule(path, _unwrapped(holder, keep_trained=False))

    # ---- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' weight updates into the base weights (W = W0 + s B A); forward cost becomes the
        base model's. safe_merge: first check that no merged weight would hold NaN/inf."""
        names = self._names_or_active(adapter_names)
        self._require(MERGEABLE, names, "merges")
        layers = [(p, m) for p, m in self._holders() if isinstance(m, AdapterLayer)]
        for path, layer in layers:  # refuse before anything is merged
            if any(layer.has_adapter(n) for n in names) and (reason := layer.merge_refusal()):
                raise NotImplementedError(f"{path}: {reason}. Nothing was merged.")
        if safe_merge:
            for path, layer in layers:
                for name in names:
                    if layer.has_adapter(name) and name not in layer.merged_adapters and not torch.isfinite(
                            layer.merge_weight(name, layer.dense_base_weight())).all():
                        raise ValueError(f"merging adapter {name!r} would put NaN/inf into {path}; the adapter is "
                                         "broken (diverged training?). Nothing was merged.")
        for _, layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged update, restoring the base weights."""
        for _, holder in self._holders():
            if isinstance(holder, AdapterLayer):
                holder.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the plain transformers model without adapter layers (trained copies of
        modules_to_save replace their originals)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap_all(keep_trained=True)

    def unload(self) -> nn.Module:
        """Return the original transformers model, without adapters and with its original weights."""
        self.unmerge_adapter()
        return self._unwrap_all(keep_trained=False)

    def _unwrap_all(self, keep_trained: bool) -> nn.Module:
        model = self.get_base_model()
        for path, holder in reversed(self._holders()):  # innermost first, as in _remove_from_layers
            model.set_submodule(path, _unwrapped(holder, keep_trained))
        return model

    def _names_or_active(self, adapter_names) -> list[str]:
        names = self._active if adapter_names is None else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"no adapter named {missing}; this model has {sorted(self.peft_config)}")
        return names

    # ---- files -----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | None = None, **kwargs) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors in PEFT's format: "default"
        in save_directory, any other adapter in save_directory/<name>. Under FSDP call it on every process
        with is_main_process=(rank == 0): the shards are gathered, rank 0 writes.

        path_initial_model_for_weight_conversion: the directory of the adapter as saved right after its
        initialisation. For a method whose init rewrites the base weights (PiSSA, OLoRA) the adapter is then
        written in a form for the original, unmodified base model (Tuner.convert_for_initial_model)."""
        if not safe_serialization:
            raise ValueError("lorakit writes safetensors only (safe_serialization=False is not supported)")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a directory")
        base_name = getattr(getattr(self.get_base_model(), "config", None), "name_or_path", None) or None
        names = self._names_or_active(selected_adapters or list(self.peft_config))
        for name in names:
            tensors = self.adapter_state_dict(name)  # on every process: sharded tensors are gathered
            if not is_main_process:
                continue
            config = self.peft_config[name]
            if path_initial_model_for_weight_conversion is not None:
                tensors, config = self.tuners[name].convert_for_initial_model(
                    tensors, config, os.fspath(path_initial_model_for_weight_conversion))
            config = dataclasses.replace(config, inference_mode=True,
                                         base_model_name_or_path=config.base_model_name_or_path or base_name)
            directory = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            write_adapter(directory, config, tensors)
        if is_main_process:  # README.md, as PEFT writes one; a README lorakit did not write is kept
            write_model_card(save_directory, facts_from_model(self, names))

    def adapter_state_dict(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """One adapter's tensors keyed as in PEFT files (adapter name removed), without those its method rebuilds
        instead of saving (`Tuner.optional_state_keys`). Sharded (FSDP) tensors are gathered, so under FSDP every
        process must call this."""
        tuner = self.tuners[adapter_name]
        rebuilt = tuner.optional_state_keys()
        return detached_copies({k: v for k, v in tuner.state_tensors().items() if k not in rebuilt})

    def _load_state(self, adapter_name: str, weights: dict[str, torch.Tensor], source: str) -> None:
        tuner = self.tuners[adapter_name]
        load_adapter_state_dict(self.get_base_model(), tuner.state_tensors(), weights, source,
                                tuner.optional_state_keys())

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        allow_pickle: bool = False, **hub_kwargs) -> "PeftModel":
        """Load an adapter directory (ours or PEFT's; or a Hub repo id) onto `model`."""
        directory = resolve_adapter_dir(model_id, **hub_kwargs)
        config = config or read_adapter_config(directory)
        weights = read_adapter_weights(directory, allow_pickle=allow_pickle)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model._load_state(adapter_name, weights, directory)
        except Exception:
            peft_model.unload()  # give the caller back the model exactly as it was
            raise
        peft_model.training_info = training_info_from_run(directory)
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False, **hub_kwargs) -> None:
        """Load another adapter into this model under `adapter_name` (inactive until set_adapter)."""
        directory = resolve_adapter_dir(model_id, **hub_kwargs)
        config = dataclasses.replace(read_adapter_config(directory), inference_mode=not is_trainable)
        weights = read_adapter_weights(directory, allow_pickle=allow_pickle)
        self.add_adapter(adapter_name, config)
        try:
            self._load_state(adapter_name, weights, directory)
        except Exception:
            self._forget(adapter_name)
            raise

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the adapter files and a model card (README.md) to the Hub repository `repo_id`, and nothing of
        the base model. Keyword arguments as transformers' push_to_hub (commit_message, private, token, revision,
        create_pr, tags, ...) plus selected_adapters; see lorakit.integrations.hub."""
        return push_adapter(self, repo_id, **kwargs)

    # ---- training ---------------------------------------------------------------------------------
    def configure_training(self, args) -> None:
        """Let the active adapters' methods read their trainer options (`args`: the trainer's TrainArgs), e.g.
        LoRA-FA; then re-apply which tensors train."""
        for name in self._active:
            self.tuners[name].configure_training(args)
        self._apply_active()

    def parameter_groups(self, args) -> list[dict]:
        """Optimizer groups over the trainable parameters, as the active adapter's method wants them (LoRA+
        gives B a larger learning rate). `args`: the trainer's TrainArgs."""
        named = {n: p for n, p in self.named_parameters() if p.requires_grad}
        return self.tuners[self._active[0]].parameter_groups(named, args)

    def training_hooks(self) -> list[TrainingHook]:
        """What the active adapters' methods do from the training loop (training_hooks.py)."""
        return [hook for name in self._active for hook in self.tuners[name].training_hooks()]

    # ---- information -----------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting adapters (and quantized weights), as PEFT does."""
        return parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> PeftModel:
    """Inject the adapter described by `peft_config` into `model` (in place) and return the PeftModel."""
    return PeftModel(model, peft_config, adapter_name)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of a module. The weights a quantized base layer stores as codes rather than
    parameters count as frozen parameters (its `frozen_weight_numel`), as PEFT counts bitsandbytes' 4-bit ones."""
    trainable = total = 0
    for param in module.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total + sum(getattr(m, "frozen_weight_numel", 0) for m in module.modules())


def _unwrapped(holder: AdapterHolder, keep_trained: bool) -> nn.Module:
    if isinstance(holder, ModulesToSaveWrapper):
        return holder.active_copy() if keep_trained else holder.original_module
    return holder.base_layer


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name == BASE_ADAPTER:
        raise ValueError(f"adapter name {name!r} is not allowed: use letters, digits, '_' or '-' "
                         f"(not {BASE_ADAPTER!r}); it becomes part of parameter names and folder names")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is not allowed: adapters are kept in torch ModuleDicts, where "
                         f"{name!r} is already a method or attribute; choose another name")


def _batch_size(args, kwargs) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None
