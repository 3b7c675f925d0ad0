"""lorakit with the rest of the Hugging Face stack: transformers' Trainer, TRL's trainers, the Hub, model cards.

    from lorakit.integrations import Trainer           # transformers.Trainer for lorakit models
    from lorakit.integrations import SFTTrainer        # trl.SFTTrainer for lorakit models (needs trl)
    from lorakit.integrations import adapter_trainer   # adapter_trainer(AnyTrainerSubclass)

The trainer classes are built on first use, so that `import lorakit` imports neither transformers' Trainer nor
TRL. Hub and model card support is used through PeftModel (push_to_hub, from_pretrained, save_pretrained).
See docs/integrations.md.
"""

from __future__ import annotations

__all__ = ["Trainer", "SFTTrainer", "adapter_trainer", "AdapterTrainerMixin", "TrainingHooksCallback"]

_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("adapter_trainer", "AdapterTrainerMixin", "TrainingHooksCallback"):
        from lorakit.integrations import trainers

        return getattr(trainers, name)
    if name == "Trainer":
        return _built(name, "transformers", "Trainer")
    if name == "SFTTrainer":
        return _built(name, "trl", "SFTTrainer")
    raise AttributeError(f"module 'lorakit.integrations' has no attribute {name!r}")


def _built(name: str, module: str, attribute: str) -> type:
    if name not in _BUILT:
        import importlib

        from lorakit.integrations.trainers import adapter_trainer

        try:
            trainer_cls = getattr(importlib.import_module(module), attribute)
        except ImportError as err:
            raise ImportError(f"lorakit.integrations.{name} needs the {module} package ({err}); install it with: "
                              f"pip install {module}") from None
        _BUILT[name] = adapter_trainer(trainer_cls)
    return _BUILT[name]
