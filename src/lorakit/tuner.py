"""The method lifecycle: one `Tuner` per adapter, with hooks whose defaults are the LoRA path.

    tuner = LoraTuner(host, config, "default")   # made by PeftModel.add_adapter, never by users
    tuner.prepare()                              # before injection: shared tensors (VeRA), nothing for LoRA
    tuner.inject()                               # wrap the targeted layers (prompt methods: wrap nothing)
    ... forward: tuner.transform_inputs(kwargs) -> base model -> tuner.transform_outputs(outputs, kwargs)
    ... save:    tuner.state_tensors()           # file key -> live tensor, in PEFT's format
    ... train:   tuner.configure_training(args), tuner.parameter_groups(...), tuner.training_hooks()
    tuner.remove()                               # undo what prepare() added outside the layers

Operations over several adapters or over files go through class-level hooks of the adapters' method:
`combine_adapters` (PeftModel.add_weighted_adapter) and `convert_for_initial_model` (save_pretrained's
path_initial_model_for_weight_conversion); the defaults refuse with a clear error.

A method is a `Tuner` subclass registered under a name (registry.py). It declares its config class, the
layer class wrapping each base layer type, and its capabilities (which decide the conformance checks that
apply); it overrides only the hooks where it differs from an additive, layer-wrapping adapter. Everything
method-specific lives in the method's package; model.py, inject.py, state.py and the trainer call hooks and
never test method names. docs/architecture.md walks through how each family of METHODS.md plugs in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.config import PeftConfig
from lorakit.inject import inject_adapter
from lorakit.modules_to_save import is_trainable_copy
from lorakit.state import adapter_holders, live_adapter_tensors

if TYPE_CHECKING:  # only for annotations: the trainer imports the engine, never the reverse
    from lorakit.training_hooks import TrainingHook

# What a method can do; PeftModel refuses an operation its adapters lack, and the conformance suite runs
# the checks a method's capabilities allow.
MERGEABLE = "mergeable"  # merge_weight/unmerge_weight fold the adapter into the base weights
MIXED_BATCH = "mixed_batch"  # rows of one batch may use different adapters (adapter_names=)
WRAPS_LAYERS = "wraps_layers"  # the adapter lives in wrapped layers (prompt methods do not)
CAPABILITIES = (MERGEABLE, MIXED_BATCH, WRAPS_LAYERS)


class Tuner:
    """One adapter of one method on one model. Subclass per method; register with `@register_method`.

    host: the PeftModel's `base_model` (a TunerModel, whose `.model` is the transformers model). Modules a
    tuner keeps outside the wrapped layers (VeRA's shared projections, a prompt encoder) are registered on
    the host, so their parameter names are PEFT's (`base_model.vera_A`, ...).
    """

    name: ClassVar[str] = ""  # set by register_method
    display_name: ClassVar[str] = ""  # how people write it ("LoRA", "VeRA"); the registered name when empty
    config_cls: ClassVar[type[PeftConfig]]
    # base layer type -> adapter layer class wrapping it (looked up along the base type's MRO)
    layers: ClassVar[dict[type[nn.Module], type[nn.Module]]] = {}
    capabilities: ClassVar[frozenset[str]] = frozenset({MERGEABLE, MIXED_BATCH, WRAPS_LAYERS})
    # trainer options (fields of train.TrainArgs) this method reads in configure_training / parameter_groups;
    # a run that sets another method's option is refused (train/config.py)
    train_options: ClassVar[frozenset[str]] = frozenset()
    # model_type -> target_modules used when the config leaves target_modules unset; None: inject.DEFAULT_TARGETS
    default_target_modules: ClassVar[dict[str, list[str]] | None] = None

    def __init__(self, host: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self.host = host
        self.config = config
        self.adapter_name = adapter_name
        self.targets: list[str] = []  # module names this adapter wraps, filled by inject()

    @property
    def model(self) -> nn.Module:
        """The transformers model the adapter is injected into."""
        return self.host.model

    # ---- building ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Before injection: create what the layers will share (VeRA's projections), check the model."""

    def inject(self) -> list[str]:
        """Wrap every targeted layer (or add this adapter to its existing adapter layer) and add the
        `modules_to_save` copies. Returns the wrapped module names. Prompt methods override to wrap nothing."""
        self.targets = inject_adapter(self.model, self.config, self.adapter_name, type(self))
        return self.targets

    def after_inject(self) -> None:
        """After injection, before any forward: data-dependent inits that need every layer in place."""

    def reset_adapter(self) -> None:
        """Re-initialise this adapter's tensors in every wrapped layer, in place, with the method's standard
        init (trainer strategies restart adapters: ReLoRA after each merge).
        `modules_to_save` copies and trainable base parameters keep their values."""
        for path, holder in adapter_holders(self.model):
            if isinstance(holder, AdapterLayer) and holder.has_adapter(self.adapter_name):
                holder.reset_adapter(self.adapter_name, self.config, path)

    @classmethod
    def can_reset(cls) -> bool:
        """True when the method wraps layers and every layer class of it implements `reset_adapter`."""
        return bool(cls.layers) and all(layer.reset_adapter is not AdapterLayer.reset_adapter for layer in cls.layers.values())

    def remove(self) -> None:
        """Undo what prepare() added outside the layers (PeftModel removes the adapter from the layers)."""

    # ---- tensors -----------------------------------------------------------------------------------------
    def trainable_base_parameters(self) -> list[str]:
        """Names (as in `model.named_parameters()`) of base parameters this adapter also trains and saves,
        e.g. biases (LoRA's bias="all")."""
        return []

    def set_trainable(self, flag: bool) -> None:
        """Set requires_grad on everything this adapter trains (its layer tensors and trainable base
        parameters). Methods with frozen adapter tensors (LoRA-FA's A) override."""
        for _, holder in adapter_holders(self.model):
            holder.set_requires_grad(self.adapter_name, flag)
        params = dict(self.model.named_parameters())
        for name in self.trainable_base_parameters():
            params[name].requires_grad_(flag)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """File key -> live tensor for everything an adapter file of this adapter holds: the wrapped layers' tensors
        and `modules_to_save` copies (state.py), trainable base parameters, plus `extra_state_tensors()`. Saving
        writes all but `optional_state_keys()`; loading copies the file's tensors into these."""
        return {**live_adapter_tensors(self.model, self.adapter_name, self.trainable_base_parameters()),
                **self.extra_state_tensors()}

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        """Saved tensors outside the wrapped layers, keyed as in PEFT files (`base_model.vera_A`, ...)."""
        return {}

    def optional_state_keys(self) -> set[str]:
        """Keys of state_tensors() this adapter rebuilds instead of saving (VeRA without save_projection regenerates
        its projections from the seed): save_pretrained leaves them out, a file may lack them, and a file that has
        them (PEFT's, say) is loaded as usual."""
        return set()

    # ---- running -----------------------------------------------------------------------------------------
    def transform_inputs(self, kwargs: dict) -> dict:
        """Rewrite the forward's keyword arguments (prompt methods: prepend virtual tokens / past_key_values)."""
        return kwargs

    def transform_outputs(self, outputs, kwargs: dict):
        """Rewrite the forward's outputs (e.g. drop the virtual-token positions from the logits)."""
        return outputs

    # ---- training ----------------------------------------------------------------------------------------
    def configure_training(self, args) -> None:
        """Before training: read the method's own trainer options from `args` (the trainer's TrainArgs, read
        with getattr), e.g. LoRA-FA freezes A. PeftModel re-applies set_trainable afterwards."""

    def parameter_groups(self, named_params: dict[str, nn.Parameter], args) -> list[dict]:
        """Optimizer groups over this adapter's trainable parameters. `args` is the trainer's TrainArgs (read
        with getattr: learning_rate, weight_decay, and method options such as loraplus_lr_ratio). Default:
        weight decay on matrices only."""
        return decay_groups(named_params, args.learning_rate, args.weight_decay)

    def training_hooks(self) -> list["TrainingHook"]:
        """Objects the training loop calls (extra loss terms, after-step updates); see training_hooks.py."""
        return []

    # ---- several adapters, files -------------------------------------------------------------------------
    @classmethod
    def combine_adapters(cls, peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                         **options) -> None:
        """Add `adapter_name` to `peft_model` as a weighted combination of `adapters` (all of this method,
        checked by PeftModel.add_weighted_adapter, which also removes the new adapter again on failure)."""
        raise ValueError(f"add_weighted_adapter is not supported for {cls.name} adapters")

    def convert_for_initial_model(self, tensors: dict[str, torch.Tensor], config: PeftConfig,
                                  initial_dir: str) -> tuple[dict[str, torch.Tensor], PeftConfig]:
        """save_pretrained(path_initial_model_for_weight_conversion=initial_dir): turn this adapter's file tensors
        and config into an adapter for the original base model, given the adapter as saved right after its
        initialisation (methods whose init rewrites the base: PiSSA, OLoRA)."""
        raise ValueError(f"path_initial_model_for_weight_conversion is not supported for {self.name} adapters")

    # ---- conformance -------------------------------------------------------------------------------------
    @classmethod
    def layer_class_for(cls, module: nn.Module) -> type[nn.Module] | None:
        """The layer class wrapping `module`, or None when this method cannot wrap it (see wrap_refusal)."""
        return None if cls.wrap_refusal(module) else cls._registered_layer_class(module)

    @classmethod
    def wrap_refusal(cls, module: nn.Module) -> str | None:
        """None when this method can wrap `module`; otherwise why not, completing "target module 'x' is a T, ..."."""
        layer_cls = cls._registered_layer_class(module)
        if layer_cls is None:
            supported = ", ".join(sorted(t.__name__ for t in cls.layers))
            return f"which {cls.name} cannot wrap (supported: {supported})"
        return layer_cls.wrap_refusal(module) if issubclass(layer_cls, AdapterLayer) else None

    @classmethod
    def _registered_layer_class(cls, module: nn.Module) -> type[nn.Module] | None:
        """The class registered for the nearest type of `module` along its MRO."""
        for klass in type(module).__mro__:
            if klass in cls.layers:
                return cls.layers[klass]
        return None

    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> PeftConfig:
        """A small config targeting `target_modules`, used by the conformance suite.

        identity=True must give an adapter that leaves the model's output unchanged (the method's standard
        init); identity=False must give a random, non-trivial adapter.
        """
        raise NotImplementedError

    @classmethod
    def sample_configs(cls, target_modules: list[str], identity: bool, base_layer: nn.Module) -> dict[str, PeftConfig]:
        """Named sample configs, one per variant of the method that can wrap `base_layer` (the targeted module);
        the conformance suite runs every check on each. Same contract as sample_config; the suite also perturbs
        the trainable tensors of identity=False adapters, so a variant whose init is always the identity (PiSSA)
        is still exercised with a non-trivial adapter. Default: the one config of sample_config."""
        return {"plain": cls.sample_config(target_modules, identity)}


def bias_parameter_names(model: nn.Module, adapter_name: str, bias: str) -> list[str]:
    """The base biases an adapter trains, by PEFT's `bias` rule: "all" every bias of the base model (not those inside
    trainable copies), "<method>_only" ("lora_only", "vera_only") the biases of the layers holding this adapter,
    "none" none."""
    if bias == "all":
        return [name for name, _ in model.named_parameters()
                if name.rsplit(".", 1)[-1] == "bias" and not is_trainable_copy(name)]
    if bias.endswith("_only"):
        return [f"{name}.base_layer.bias" for name, module in model.named_modules()
                if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name)
                and getattr(module.base_layer, "bias", None) is not None]
    return []


def decay_groups(named_params: dict[str, nn.Parameter], lr: float, weight_decay: float,
                 lr_scale=lambda name: 1.0) -> list[dict]:
    """AdamW groups keyed by (weight decay on matrices only, lr_scale(name)); each group carries its own lr."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in named_params.items():
        groups.setdefault((param.ndim >= 2, float(lr_scale(name))), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), params in sorted(groups.items())]
