"""PeftModel: a transformers model with named adapters injected; PEFT's public API in one class.

The structure mirrors HuggingFace PEFT (`peft_model.base_model.model` is the transformers model), so parameter
names, and therefore adapter files, are the same in both libraries. PeftModel holds the adapters' state (one Tuner
per adapter, the active list) and is the one place of the public surface; the work of some methods lives in
model_merging.py (merge/unload), model_files.py (save/load) and model_status.py (get_model_status/get_layer_status).
`base_model` (tuner_model.py) answers PEFT's tuner-level calls (`model.base_model.set_adapter([...])`) by
running them here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import MutableMapping
import warnings
import weakref

import torch
from torch import nn

from lorakit import model_files, model_merging, model_status
from lorakit.adapter_layer import BASE_ADAPTER, AdapterHolder, AdapterLayer, BatchRouting
from lorakit.config import PeftConfig
from lorakit.integrations.hub import push_adapter
from lorakit.integrations.model_card import training_info_from_run
from lorakit.integrations.signature import forward_with_model_signature
from lorakit.modules_to_save import ModulesToSaveWrapper
from lorakit.ops.lm_head import head_on_lorakit_matmul
from lorakit.registry import method_for_config
from lorakit.state import adapter_holders, detached_copies
from lorakit.tasks import SEQ_CLS_HEAD_NAMES
from lorakit.training_hooks import TrainingHook
from lorakit.tuner import MIXED_BATCH, Tuner
from lorakit.tuner_model import TunerModel

DEFAULT_ADAPTER = model_files.DEFAULT_ADAPTER


class PeftModel(nn.Module):
    """A model with adapters. Build with `get_peft_model(model, config)` or `PeftModel.from_pretrained`.

    autocast_adapter_dtype: adapters on a float16/bfloat16 base are kept in float32 (stable training), as in PEFT;
    False keeps them in the base layer's dtype. low_cpu_mem_usage: the adapter's layer tensors are created on the
    meta device (no memory, no values), to be filled by loading weights (set_peft_model_state_dict), as in PEFT;
    loading methods (from_pretrained, load_adapter) accept it and load directly.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER,
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("this model already has adapters; use add_adapter() / load_adapter() on it")
        self.base_model = TunerModel(model, self)
        self.tuners: dict[str, Tuner] = {}  # adapter name -> its method's lifecycle object (tuner.py)
        self._active: list[str] = []
        # keyword arguments forward() takes for itself (PEFT's attribute, read by trainers that filter inputs)
        self.special_peft_forward_args = {"adapter_names"}
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                         autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name, inference_mode=peft_config.inference_mode)
        self.train(model.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # a copy (copy.deepcopy) gets a base_model of its own, which must point back to the copy
        self.base_model.__dict__["_owner"] = weakref.ref(self)

    @property
    def peft_config(self) -> "AdapterConfigs":
        """Adapter name -> its config: a live view (it follows adds and deletes, as PEFT's dict does). The tuners
        hold the configs, since a method may update its own during training (AdaLoRA records the rank pattern it
        allocated), and a save writes the current one."""
        return AdapterConfigs(self.tuners)

    @property
    def peft_type(self):
        """The adapters' PeftType (one PeftModel holds adapters of one method)."""
        return next(iter(self.tuners.values())).config.peft_type if self.tuners else None

    @property
    def prefix(self) -> str:
        """The prefix of the adapters' parameter names ("lora_" for LoRA), as PEFT's tuner classes have it."""
        return next(iter(self.tuners.values())).prefix if self.tuners else ""

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
        model = self.get_base_model()
        with self._mixed_batch(adapter_names, args, kwargs), head_on_lorakit_matmul(model):
            return model.generate(*args, **kwargs)

    def _running_tuners(self) -> list[Tuner]:
        """The active adapters' tuners, unless the adapters are disabled (disable_adapter())."""
        return [] if self._disabled else [self.tuners[n] for n in self._active]

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names, args, kwargs):
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str (one adapter "
                            "name per input row)")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (known: "
                             f"{sorted(self.peft_config)}, or {BASE_ADAPTER!r} for the base model)")
        self._require(MIXED_BATCH, {n for n in adapter_names if n != BASE_ADAPTER}, "mixed-adapter batches")
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {batch} respectively.")
        holders = [holder for _, holder in self._holders()]
        if any(isinstance(m, AdapterLayer) and m.merged_adapters for m in holders):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        routing = BatchRouting(list(adapter_names))
        for holder in holders:
            holder.routing = routing
        try:
            yield
        finally:
            for holder in holders:
                holder.routing = None

    # ---- adapters by name ------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Inject a new adapter (inactive and frozen until set_adapter) with its method's standard init."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists; delete_adapter('{adapter_name}') "
                             "first or choose another name")
        method = method_for_config(peft_config)
        peft_config.validate()
        if self.tuners and peft_config.peft_type != self.peft_type:
            raise ValueError(f"Cannot combine adapters with different peft types. Found {self.peft_type} and "
                             f"{peft_config.peft_type}. (one PeftModel holds adapters of one method)")
        biased = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if biased and getattr(peft_config, "bias", "none") != "none":
            raise ValueError(f"{type(peft_config).__name__.replace('Config', 'Model')} supports only 1 adapter with "
                             f"bias. When using multiple adapters, set bias to 'none' for all adapters (adapter "
                             f"{biased[0]!r} already trains biases).")
        if peft_config.task_type == "SEQ_CLS" and hasattr(peft_config, "modules_to_save"):
            # train the new classification head in full, as PEFT does (PEFT's files may list a head twice); the
            # caller's config object gets the heads too, as in PEFT
            heads = list(dict.fromkeys(peft_config.modules_to_save or []))
            peft_config.modules_to_save = heads + [h for h in SEQ_CLS_HEAD_NAMES if h not in heads]
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
        if not autocast_adapter_dtype:
            self._cast_to_base_dtype(adapter_name)
        if low_cpu_mem_usage:  # no memory for weights that will be loaded anyway (set_peft_model_state_dict)
            for _, holder in self._holders():
                if isinstance(holder, AdapterLayer) and holder.has_adapter(adapter_name):
                    holder.move_adapter(adapter_name, "meta")
        self._push_active(self._active)
        tuner.set_trainable(False)

    def _cast_to_base_dtype(self, adapter_name: str) -> None:
        """autocast_adapter_dtype=False: the adapter's tensors take the dtype of the layer they sit in."""
        for _, holder in self._holders():
            if isinstance(holder, AdapterLayer) and holder.has_adapter(adapter_name):
                dtype = holder.base_weight.dtype
                for tensor in holder.adapter_tensors(adapter_name).values():
                    if tensor.is_floating_point() and dtype.is_floating_point:
                        tensor.data = tensor.data.to(dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapter(s) active (their outputs add up). The active adapters become trainable, unless
        inference_mode=True; the others are frozen. Merged adapters are unmerged first (with PEFT's warning)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {', '.join(missing)} not found; this model has {sorted(self.peft_config)}")
        self._push_active(names)  # refuses before anything changes
        if any(layer.merged_adapters for _, layer in model_merging.adapter_layers(self)):
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", UserWarning,
                          stacklevel=2)
            model_merging.unmerge(self, warn=False)
        self._active = names
        self._apply_active(inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter. When it was active, the other active adapters stay active; when none is left, the
        first remaining adapter (by name) becomes active, with PEFT's warning."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; this model has {sorted(self.peft_config)}")
        if any(adapter_name in layer.merged_adapters for _, layer in model_merging.adapter_layers(self)):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        was_active = adapter_name in self._active
        self._forget(adapter_name)
        if not was_active:
            return
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.tuners:
            remaining = [sorted(self.tuners)[0]]
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{remaining[0]}.", UserWarning, stacklevel=2)
        self._active = remaining
        self._apply_active()

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
            raise ValueError(f"Adapter {', '.join(missing)} does not exist; this model has {sorted(self.peft_config)}")
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"adapters lists an adapter twice: {list(adapters)}; give each once with its weight")
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(adapters):
            raise ValueError(f"weights must give one number per adapter ({len(adapters)}), got {weights!r}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ValueError(f"weights must be numbers, got {list(weights)!r}")
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists; delete_adapter('{adapter_name}') "
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
        self.tuners[adapter_name].set_trainable(False)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several, or none, are active), as in PEFT."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self._active[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside disable_adapter() / after disable_adapter_layers(), or without active adapters."""
        return not self._disabled and bool(self._active)

    @property
    def modules_to_save(self) -> set[str] | None:
        """The union of the adapters' modules_to_save (None when there is none), as in PEFT."""
        modules = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or [])}
        return modules or None

    @property
    def targeted_module_names(self) -> list[str]:
        """Names of the modules the adapters wrap, each once: the first adapter's in the order it found them, then
        each further adapter's new ones (PEFT's attribute of its tuner models)."""
        return list(dict.fromkeys(t for tuner in self.tuners.values() for t in tuner.targets))

    @property
    def targeted_parameter_names(self) -> list[str]:
        """Always empty: lorakit targets modules (PEFT's target_parameters is not implemented)."""
        return []

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the named adapters' tensors trainable (or frozen), whether active or not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {', '.join(missing)} does not exist; this model has {sorted(self.peft_config)}")
        for name in names:
            self.tuners[name].set_trainable(requires_grad)

    # ---- enabling and disabling ------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this block (merged adapters are unmerged, then merged back)."""
        status = {holder.disabled for _, holder in self._holders()}
        if len(status) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. This "
                          "is most likely unintentional. After exiting the disable_adapter context, all adapters will be "
                          "enabled", UserWarning, stacklevel=3)
        merged = {path: list(m.merged_adapters) for path, m in model_merging.adapter_layers(self)}
        was_enabled = status != {True}
        self._set_enabled(False)
        try:
            yield
        finally:
            if was_enabled:
                self._set_enabled(True)
                for path, layer in model_merging.adapter_layers(self):
                    if merged.get(path):
                        layer.merge(merged[path])

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off (outputs are the base model's) until enable_adapter_layers(); merged adapters
        are unmerged."""
        for name in self._active:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                              "the same output as the base model would without adaption.", UserWarning, stacklevel=2)
        self._set_enabled(False)

    def enable_adapter_layers(self) -> None:
        """Switch the adapters on again after disable_adapter_layers()."""
        self._set_enabled(True)

    def _set_enabled(self, enabled: bool) -> None:
        """Switch adapters off (unmerged, frozen: nothing trains while they do nothing) or on again (the active
        adapters train again), as PEFT does."""
        if not enabled:
            model_merging.unmerge(self, warn=False)
        for _, holder in self._holders():
            holder.disabled = not enabled
        self._disabled = not enabled
        if enabled:
            self._apply_active()
        else:
            for tuner in self.tuners.values():
                tuner.set_trainable(False)

    _disabled = False  # adapters switched off: no tuner rewrites inputs or outputs
    # How the adapter was trained, for its model card (integrations/model_card.py): set by from_pretrained for a
    # `lorakit train` run's adapter and by the Trainer integration; None: unknown.
    training_info = None

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _holders(self) -> list[tuple[str, AdapterHolder]]:
        return adapter_holders(self.get_base_model())

    def _apply_active(self, inference_mode: bool = False) -> None:
        """Push the active list to every layer and make exactly the active adapters' tensors trainable (none with
        inference_mode)."""
        self._push_active(self._active)
        for param in self.parameters():  # also tensors tuners keep outside the model (on base_model)
            param.requires_grad_(False)
        if not inference_mode:
            for name in self._active:
                self.tuners[name].set_trainable(True)

    def _push_active(self, names: list[str]) -> None:
        """Give every layer the active list (checked first, so a refusal changes nothing). A modules_to_save
        wrapper's copy replaces its module, so it gets only its own adapters, and only one of them can be active."""
        holders = self._holders()
        for path, holder in holders:
            own = [a for a in names if holder.has_adapter(a)]
            if isinstance(holder, ModulesToSaveWrapper) and len(own) > 1:
                raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper: {path} has a "
                                 f"trained copy for each of {own}, which cannot all be active")
        for _, holder in holders:
            wrapper = isinstance(holder, ModulesToSaveWrapper)
            holder.active_adapters = [a for a in names if not wrapper or holder.has_adapter(a)]

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
                model.set_submodule(path, model_merging.unwrapped(holder, keep_trained=False))

    # ---- merging (model_merging.py) --------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' weight updates into the base weights (W = W0 + s B A); forward cost becomes the
        base model's. safe_merge: first check that no merged weight would hold NaN/inf."""
        model_merging.merge(self, adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged update, restoring the base weights."""
        model_merging.unmerge(self)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the plain transformers model without adapter layers (trained copies of
        modules_to_save replace their originals)."""
        model_merging.merge(self, adapter_names, safe_merge)
        return model_merging.unwrap_all(self, keep_trained=True)

    def unload(self) -> nn.Module:
        """Return the original transformers model, without adapters and with its original weights."""
        model_merging.unmerge(self, warn=False)
        return model_merging.unwrap_all(self, keep_trained=False)

    # ---- files (model_files.py) ------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors in PEFT's format: "default"
        in save_directory, any other adapter in save_directory/<name>; and a README.md model card.

        save_embedding_layers: also save the full input/output embedding weights (True), not (False), or as PEFT
        decides ("auto": when an embedding layer is targeted, or the vocabulary was resized). Under FSDP call it on
        every process with is_main_process=(rank == 0): the shards are gathered, rank 0 writes.
        path_initial_model_for_weight_conversion: the directory of the adapter as saved right after its
        initialisation; an adapter whose init rewrote the base weights (PiSSA, OLoRA) is then written for the
        original base model (Tuner.convert_for_initial_model)."""
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)} (lorakit does not "
                            "push to the Hub from save_pretrained)")
        model_files.save_adapters(self, save_directory, selected_adapters, safe_serialization, save_embedding_layers,
                                  is_main_process, path_initial_model_for_weight_conversion)

    def adapter_state_dict(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """One adapter's tensors keyed as in PEFT files (adapter name removed), without those its method rebuilds
        instead of saving (`Tuner.optional_state_keys`). Sharded (FSDP) tensors are gathered, so under FSDP every
        process must call this."""
        tuner = self.tuners[adapter_name]
        rebuilt = tuner.optional_state_keys()
        return detached_copies({k: v for k, v in tuner.state_tensors().items() if k not in rebuilt})

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict | None = None, **kwargs) -> "PeftModel":
        """Load an adapter directory (ours or PEFT's; a training run's output_dir; or a Hub repo id) onto `model`.
        The model is left in eval mode (dropout off) unless is_trainable. config: use this config object instead of
        the directory's (its inference_mode is set). kwargs: Hub options (revision, subfolder, token, ...),
        ignore_mismatched_sizes, allow_pickle (read a pickle adapter_model.bin)."""
        model_files.check_load_options(kwargs, ephemeral_gpu_offload, key_mapping)
        directory = model_files.adapter_directory(model_id, kwargs)
        config = model_files.read_config(directory, config, is_trainable)
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            model_files.load_into(peft_model, adapter_name, directory, kwargs.get("ignore_mismatched_sizes", False),
                                  kwargs.get("allow_pickle", False))
        except Exception:
            peft_model.unload()  # give the caller back the model exactly as it was
            raise
        peft_model.training_info = training_info_from_run(directory)
        if kwargs.get("device_map") is not None:
            peft_model.to(model_files.single_device(kwargs["device_map"]))
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                     low_cpu_mem_usage: bool = False, key_mapping: dict | None = None,
                     **kwargs) -> model_files.LoadResult:
        """Load another adapter into this model under `adapter_name` (inactive until set_adapter); returns the
        load result (missing_keys, unexpected_keys), as PEFT. The model is put in eval mode unless is_trainable.
        Loading into an existing adapter of that name replaces its weights."""
        model_files.check_load_options(kwargs, ephemeral_gpu_offload, key_mapping)
        directory = model_files.adapter_directory(model_id, kwargs)
        created = adapter_name not in self.peft_config
        if created:
            config = model_files.read_config(directory, None, is_trainable)
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            result = model_files.load_into(self, adapter_name, directory, kwargs.get("ignore_mismatched_sizes", False),
                                           kwargs.get("allow_pickle", False))
        except Exception:
            if created:
                self._forget(adapter_name)
            raise
        device = torch_device or model_files.single_device(kwargs.get("device_map"))
        if device is not None:
            self.to(device)
        if not is_trainable:
            self.eval()
        return result

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

    @property
    def base_model_torch_dtype(self):
        return getattr(self.get_base_model(), "dtype", None)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting adapters (and quantized weights), as PEFT does."""
        return parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self) -> list[model_status.TunerLayerStatus]:
        """The status of each adapter layer (model_status.TunerLayerStatus), named as PEFT names them: by their path
        in base_model ("model.<path in the transformers model>")."""
        return model_status.layer_status([(f"model.{path}", holder) for path, holder in self._holders()])

    def get_model_status(self) -> model_status.TunerModelStatus:
        """The status of the adapters over the whole model (model_status.TunerModelStatus)."""
        peft_types = {name: str(getattr(c.peft_type, "value", c.peft_type)) for name, c in self.peft_config.items()}
        kind = type(next(iter(self.peft_config.values()))).__name__.replace("Config", "Model") if self.tuners else "None"
        return model_status.model_status(self.get_base_model(), self._holders(), peft_types, kind,
                                         self.get_nb_trainable_parameters())


class AdapterConfigs(MutableMapping):
    """PeftModel.peft_config: adapter name -> config, read from (and written to) the adapters' tuners."""

    def __init__(self, tuners: dict[str, Tuner]) -> None:
        self._tuners = tuners

    def __getitem__(self, name: str) -> PeftConfig:
        return self._tuners[name].config

    def __setitem__(self, name: str, config: PeftConfig) -> None:
        if name not in self._tuners:
            raise KeyError(f"no adapter named {name!r}; add adapters with add_adapter()")
        if type(config) is not type(self._tuners[name].config):
            raise TypeError(f"adapter {name!r} is a {type(self._tuners[name].config).__name__} adapter; its config "
                            f"cannot be replaced by a {type(config).__name__}")
        config.validate()
        self._tuners[name].config = config

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"use delete_adapter({name!r}) to remove an adapter")

    def __iter__(self):
        return iter(list(self._tuners))

    def __len__(self) -> int:
        return len(self._tuners)

    def __repr__(self) -> str:
        return repr(dict(self))


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER,
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Inject the adapter described by `peft_config` into `model` (in place) and return the PeftModel.

    mixed: PEFT's PeftMixedModel mixes adapters of different methods; lorakit's PeftModel already runs several
    adapters of one method together, so mixed=True returns a PeftModel (adding another method's adapter is refused).
    revision: the base model's revision, recorded in the config. autocast_adapter_dtype, low_cpu_mem_usage: see
    PeftModel."""
    if not isinstance(mixed, bool):
        raise TypeError(f"mixed must be True or False, got {mixed!r}")
    # as PEFT: the config names the model it is applied to (transformers' name_or_path; "" is no name)
    old_name, new_name = peft_config.base_model_name_or_path, model.__dict__.get("name_or_path") or None
    peft_config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.", UserWarning,
                      stacklevel=2)
    if any(isinstance(m, AdapterHolder) for m in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time. If you want to reload the model "
                      "with a different config, make sure to call `.unload()` before.", UserWarning, stacklevel=2)
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, overwriting "
                          f"with revision {revision}", UserWarning, stacklevel=2)
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     low_cpu_mem_usage=low_cpu_mem_usage)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of a module. The weights a quantized base layer stores as codes rather than
    parameters count as frozen parameters (its `frozen_weight_numel`), as PEFT counts bitsandbytes' 4-bit ones."""
    trainable = total = 0
    for param in module.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total + sum(getattr(m, "frozen_weight_numel", 0) for m in module.modules())


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

