"""transformers' Trainer and TRL's trainers on a lorakit model, with PEFT-format adapter checkpoints.

    from lorakit.integrations import Trainer          # in place of: from transformers import Trainer
    from lorakit.integrations import SFTTrainer       # in place of: from trl import SFTTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(...), LoraConfig(...))
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...)
    trainer.train()

and `adapter_trainer(AnyTrainerSubclass)` for other trainers. A model without lorakit adapters trains exactly as
with the original class.

These trainers recognise HuggingFace PEFT's models by class (`isinstance(model, peft.PeftModel)`) and then save
adapter files, reload them, and look through the wrapper to the transformers model; a lorakit model is not of that
class. (transformers' plain Trainer does train a lorakit model: `PeftModel.forward` shows the wrapped model's
inputs and labels, integrations/signature.py; but its checkpoints then hold the whole model.) What the classes
here do for a lorakit model:

- construction sees the wrapped transformers model, as these trainers see through a PEFT model (label names,
  loss arguments; TRL's SFTTrainer installs its fused LM head on it); training then runs the lorakit model;
- `_save` (every checkpoint-N, and save_model) writes the adapter files (adapter_config.json,
  adapter_model.safetensors, a README.md model card with the trainer's metrics) and the tokenizer, in place of
  the whole model's weights, so each checkpoint loads with `peft.PeftModel.from_pretrained` as it is;
- `_load_from_checkpoint` (resume_from_checkpoint) and `_load_best_model` (load_best_model_at_end) read the
  adapter files back into the live adapters;
- the training hooks of the adapter's method (AdaLoRA's rank allocation; training_hooks.py) run from a callback;
  their extra loss reaches the trainer through the model's loss (Tuner.transform_outputs), as with PEFT. Such
  an adapter changes shape while it trains, so resuming it and load_best_model_at_end are refused (use
  `lorakit train` for those);
- `peft_config=<a lorakit config>` (TRL's argument, which otherwise takes only PEFT's configs) wraps the model.

Tested with transformers 5.23 and TRL 1.16 in one process. Under DDP every process trains and the main one writes,
as for any model. FSDP and DeepSpeed shard the model and save it their own way: refused here (`lorakit train`
trains adapters under FSDP: train.distributed=fsdp).
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from lorakit.adapter_files import WEIGHTS_NAME, read_adapter_weights
from lorakit.config import PeftConfig

logger = logging.getLogger(__name__)
DEFAULT_ADAPTER = "default"


class AdapterTrainerMixin:
    """Put before a transformers Trainer class: `class MyTrainer(AdapterTrainerMixin, SFTTrainer)` (what
    `adapter_trainer` builds). See the module docstring."""

    def __init__(self, model=None, *args, **kwargs):
        config = kwargs.get("peft_config")
        if isinstance(config, PeftConfig):  # a lorakit config: TRL's own peft_config takes only PEFT's
            kwargs.pop("peft_config")
            model = _wrap(model, config)
        peft_model = _lorakit_model(model)
        if peft_model is None:
            super().__init__(model, *args, **kwargs)
            return
        super().__init__(peft_model.get_base_model(), *args, **kwargs)
        self._adopt(peft_model)

    def _adopt(self, peft_model) -> None:
        """Train `peft_model`, now that construction has seen (and set up) the transformers model it wraps."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("lorakit.integrations trainers do not support FSDP or DeepSpeed (they shard the model and "
                             "checkpoint it their own way); train in one process or with DDP, or use `lorakit train` "
                             "with train.distributed=fsdp")
        hooks = peft_model.training_hooks()
        if hooks and self.args.load_best_model_at_end:
            raise ValueError(f"load_best_model_at_end is not supported for {_methods(peft_model)} adapters: their "
                             "method changes the adapter's shape while it trains (training hooks), so an earlier "
                             "checkpoint cannot be loaded back into it. Leave load_best_model_at_end off and load the "
                             "best checkpoint with PeftModel.from_pretrained, or train with `lorakit train`")
        self.model = self.model_wrapped = peft_model
        self.callback_handler.model = peft_model
        if self.place_model_on_device:  # tensors a method keeps outside the wrapped model (VeRA's projections)
            self._move_model_to_device(peft_model, self.args.device)
        if hooks:
            self.add_callback(TrainingHooksCallback(hooks))

    def _lorakit_model(self):
        return _lorakit_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))

    # ---- saving ------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter files + model card + tokenizer, where the Trainer would write the model's weights."""
        peft_model = self._lorakit_model()
        if peft_model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the adapters to %s", output_dir)
        from lorakit.integrations.model_card import training_info_from_trainer

        peft_model.training_info = training_info_from_trainer(self)
        peft_model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        return None

    # ---- loading -----------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        peft_model = _lorakit_model(model) if model is not None else self._lorakit_model()
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if peft_model.training_hooks():
            raise ValueError(f"resume_from_checkpoint is not supported for {_methods(peft_model)} adapters: their "
                             "method changes the adapter's shape while it trains (training hooks) and keeps state "
                             "the Trainer does not checkpoint. Train them with `lorakit train`, which resumes them")
        logger.info("Loading the adapters from %s", resume_from_checkpoint)
        load_adapters_in_place(peft_model, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        peft_model = self._lorakit_model()
        if peft_model is None:
            return super()._load_best_model()
        logger.info("Loading the best adapters from %s (score: %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_adapters_in_place(peft_model, self.state.best_model_checkpoint)
        return None


def adapter_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (transformers.Trainer or any subclass: TRL's SFTTrainer, DPOTrainer, ...) able to train a
    lorakit model: `adapter_trainer(SFTTrainer)(model=peft_model, args=..., train_dataset=...)`."""
    if not isinstance(trainer_cls, type) or not any(c.__name__ == "Trainer" and c.__module__.startswith(
            "transformers") for c in trainer_cls.__mro__):
        raise TypeError(f"adapter_trainer takes transformers.Trainer or a subclass of it, got {trainer_cls!r}")
    if issubclass(trainer_cls, AdapterTrainerMixin):
        return trainer_cls
    return type(trainer_cls.__name__, (AdapterTrainerMixin, trainer_cls),
                {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} for lorakit models "
                                                    f"(lorakit.integrations.trainers).\n\n{trainer_cls.__doc__ or ''}"})


def load_adapters_in_place(peft_model, directory: str) -> list[str]:
    """Copy the adapter weights saved in `directory` (the default adapter at its top, any other in the folder of its
    name) into `peft_model`'s live adapters of the same names; the optimizer keeps pointing at the same tensors.
    Returns the names loaded; every active adapter must be there."""
    loaded = []
    for name in peft_model.peft_config:
        folder = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            peft_model._load_state(name, read_adapter_weights(folder), folder)
            loaded.append(name)
    missing = [name for name in peft_model.active_adapters if name not in loaded]
    if missing:
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_NAME} for the active adapter(s) {missing} (the "
                                "default adapter at its top, others in a folder of their name); is it a checkpoint "
                                "of this model?")
    return loaded


def _wrap(model, config: PeftConfig):
    from lorakit.model import PeftModel, get_peft_model

    if isinstance(model, str):
        raise ValueError(f"with a lorakit peft_config, pass the model itself, not its name {model!r}: load it first "
                         "(e.g. AutoModelForCausalLM.from_pretrained(...), or lorakit.models.load_model_and_tokenizer "
                         "for the embedded models)")
    if isinstance(_lorakit_model(model), PeftModel):
        raise ValueError("the model already has lorakit adapters; pass either the PeftModel or a base model with "
                         "peft_config, not both")
    return get_peft_model(model, config)


def _lorakit_model(model):
    from lorakit.model import PeftModel

    return model if isinstance(model, PeftModel) else None


def _methods(peft_model) -> str:
    return ", ".join(sorted({type(peft_model.tuners[n]).display_name or peft_model.tuners[n].name
                             for n in peft_model.active_adapters}))


class TrainingHooksCallback(TrainerCallback):
    """Runs lorakit training hooks (training_hooks.py) from a transformers Trainer: before and after each optimizer
    step and at each step's end. `step` is the hooks' step count: optimizer steps done (1 after the first)."""

    def __init__(self, hooks) -> None:
        self.hooks = list(hooks)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        for hook in self.hooks:
            hook.check_run(state.max_steps)
            hook.on_train_start(state.global_step, optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.before_optimizer_step(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for hook in self.hooks:  # the Trainer counts this step after the callback; the hooks count it now
            hook.after_optimizer_step(state.global_step + 1)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        for hook in self.hooks:
            hook.on_step_end(state.global_step, optimizer)
