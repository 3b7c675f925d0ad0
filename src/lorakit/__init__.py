"""lorakit: parameter-efficient fine-tuning of transformers models, centred on LoRA.

The API follows HuggingFace PEFT, so a PEFT user changes one import:

    from lorakit import LoraConfig, get_peft_model, PeftModel, TaskType
"""

from lorakit.cli import startup as _startup  # first: Ctrl-C while the `lorakit` command imports exits quietly

_startup.install()
from lorakit import methods  # noqa: F401  (registers every method)
from lorakit.config import PeftConfig, PeftType
from lorakit.errors import NoMatchingPeftModuleError, PeftError
from lorakit.methods.adalora import AdaLoraConfig
from lorakit.methods.lora import LoraConfig, enable_lora_fa
from lorakit.methods.lora.config import LoraRuntimeConfig
from lorakit.methods.lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from lorakit.methods.quant import NF4Linear, NF4Tensor, quantize_model, quantize_nf4
from lorakit.methods.vera import VeraConfig
from lorakit.model import PeftModel, get_peft_model
from lorakit.peft_helpers import (
    get_base_model_state_dict,
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from lorakit.registry import get_method, register_method, registered_methods
from lorakit.tasks import TaskType
from lorakit.training_hooks import TrainingHook
from lorakit.tuner import Tuner

# PEFT's task-specific class names, for code written against PEFT; lorakit needs one class for all tasks.
PeftModelForCausalLM = PeftModelForSeq2SeqLM = PeftModelForSequenceClassification = PeftModel
PeftModelForTokenClassification = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "VeraConfig", "AdaLoraConfig", "enable_lora_fa", "NF4Linear", "NF4Tensor", "PeftConfig",
    "quantize_model", "quantize_nf4", "PeftModel", "TaskType", "get_peft_model", "get_method", "register_method",
    "registered_methods", "Tuner", "TrainingHook", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "PeftType", "LoraRuntimeConfig", "get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model",
    "hotswap_adapter", "prepare_model_for_compiled_hotswap", "load_peft_weights", "get_model_status", "get_layer_status", "get_base_model_state_dict",
    "set_base_model_state_dict", "PeftError", "NoMatchingPeftModuleError",
]
