"""What several commands share: the model / adapter / generation options, loading, and prompt building.

Prompts are built by the data module's `ExampleEncoder`, the same code that renders training examples,
so a model sees at inference exactly the template it was trained with.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from lorakit.config import CONFIG_NAME
from lorakit.methods.quant import QUANTIZERS
from lorakit.models.loading import DTYPES
from lorakit.tasks import SEQ_CLS_HEAD_NAMES
from lorakit.train.templates import TEMPLATES


# ---- options ----------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="M",
                       help="base model: an embedded alias (smollm2, minilm), a local model directory or a Hub id. "
                            "Default: the base model named in the adapter's adapter_config.json")
    group.add_argument("--adapter", metavar="DIR", required=adapter_required,
                       help="adapter directory (adapter_config.json + adapter_model.safetensors), or a training "
                            "run's output_dir (its adapter/ is used)")
    group.add_argument("--dtype", choices=[d for d in DTYPES if d], default=None,
                       help="dtype of the weights (default float32; auto = as saved)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="read an adapter saved only as adapter_model.bin, a pickle file (read with "
                            "torch.load(weights_only=True)); only for files you trust")
    group.add_argument("--quantization", choices=tuple(QUANTIZERS), default=None,
                       help="store the base model's linear weights quantized (nf4: 4-bit NormalFloat, as QLoRA "
                            "trains). Default: dense, also for an adapter trained on an NF4 base")


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                       help=f"most tokens generated per answer (default {max_new_tokens})")
    group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=1.0, metavar="T",
                       help="sampling temperature (> 0, default 1.0)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P",
                       help="nucleus sampling: keep this probability mass (0 < p <= 1, default 1.0 = off)")
    group.add_argument("--seed", type=int, default=None, metavar="N",
                       help="seed of the sampler, for repeatable samples")
    group.add_argument("--template", choices=TEMPLATES, default="auto",
                       help="chat template: auto (the tokenizer's, else the Alpaca-style fallback), tokenizer, "
                            "alpaca; use the one the adapter was trained with (default auto)")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for generate_batch / stream_generate, validated (ValueError names the option)."""
    from lorakit.eval.generation import GenerationOptions

    options = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return {"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample,
            "temperature": options.temperature, "top_p": options.top_p, "seed": options.seed}


def check_positive_option(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def check_output_file(path: str | None) -> None:
    """Fail before the slow work, not after it, when an --output file cannot be written there."""
    if path is None:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the directory of --output {path!r} does not exist")


# ---- adapters -----------------------------------------------------------------------------------------
def head_num_labels(adapter_dir: str) -> int | None:
    """The size of the classification head saved with a SEQ_CLS adapter (modules_to_save), if any."""
    from safetensors import safe_open

    from lorakit.adapter_files import WEIGHTS_NAME

    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    try:
        with safe_open(path, "pt") as fh:
            keys = [k for k in fh.keys() if k.endswith(".weight") and any(f".{h}." in k for h in SEQ_CLS_HEAD_NAMES)]
            # a plain head (score / classifier) or the last projection of a head module (RoBERTa's out_proj)
            head = next((k for k in keys if k.endswith("out_proj.weight")), None) or next(
                (k for k in keys if k.endswith(tuple(f".{h}.weight" for h in SEQ_CLS_HEAD_NAMES))), None)
            return fh.get_slice(head).get_shape()[0] if head else None
    except Exception:  # noqa: BLE001 - missing or unreadable: loading the adapter reports it clearly
        return None


# ---- loading ------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: object  # a PeftModel when an adapter was given, else the transformers model
    tokenizer: object
    model_name: str
    task_type: str
    adapter_dir: str | None = None
    adapter_config: object = None  # the PeftConfig read from adapter_config.json


def read_adapter(args: argparse.Namespace):
    """(adapter directory, its PeftConfig), or (None, None) without --adapter. Reads no weights yet."""
    if not getattr(args, "adapter", None):
        return None, None
    from lorakit.adapter_files import read_adapter_config, resolve_adapter_dir

    directory = resolve_adapter_dir(args.adapter)
    return directory, read_adapter_config(directory)


def load_model(args: argparse.Namespace, task_type: str | None = None, label_names=None,
               why: str = "") -> Loaded:
    """The base model (--model, or the adapter's base) with the adapter (--adapter) on top, in eval mode.

    task_type: what the caller needs (an adapter for another task is an error, `why` says why), or None
    for the adapter's own task type (CAUSAL_LM without adapter)."""
    from lorakit.models import load_model_and_tokenizer
    from lorakit.models.adapters import load_adapter_for_inference

    adapter_dir, adapter_config = read_adapter(args)
    adapter_task = getattr(adapter_config, "task_type", None)
    if task_type and adapter_task and adapter_task != task_type:
        raise ValueError(f"the adapter {adapter_dir} is for {adapter_task}, but {why or 'this command'} needs "
                         f"{task_type}")
    task_type = task_type or adapter_task or "CAUSAL_LM"
    name = args.model or getattr(adapter_config, "base_model_name_or_path", None)
    if not name:
        raise ValueError("--model is required (and the adapter config names no base model)"
                         if adapter_config else "--model is required: e.g. --model smollm2")
    num_labels = head_num_labels(adapter_dir) if adapter_dir and task_type == "SEQ_CLS" else None
    if adapter_dir and task_type == "SEQ_CLS" and label_names is None:  # the classes it was trained with
        from lorakit.label_names import read_label_names

        label_names = read_label_names(adapter_dir)
    if num_labels is not None and label_names is not None and num_labels != len(label_names):
        raise ValueError(f"the adapter's classification head has {num_labels} classes but the data has "
                         f"{len(label_names)} ({', '.join(label_names)}); evaluate on data with the same labels")
    try:
        model, tokenizer = load_model_and_tokenizer(name, task_type, num_labels=num_labels, label_names=label_names,
                                                    dtype=args.dtype, quantization=getattr(args, "quantization", None))
    except (OSError, ValueError) as err:
        if args.model:
            raise
        raise ValueError(f"{err} (this base model is named in {adapter_dir}/{CONFIG_NAME}; pass --model to "
                         "choose the base model)") from None
    if adapter_dir:  # refuses NaN/inf weights, and pickle files without --allow-pickle
        model = load_adapter_for_inference(model, adapter_dir, allow_pickle=getattr(args, "allow_pickle", False))
    model.eval()
    return Loaded(model, tokenizer, name, task_type, adapter_dir, adapter_config)


def classifier_classes(args: argparse.Namespace) -> tuple[list[str] | None, int | None, str]:
    """(class names in head order or None, head size or None, what they come from) of the classifier to load:
    the adapter's labels.json and saved head, or a full model's config (id2label); (None, None, ...) for a
    model without a trained head."""
    from lorakit.label_names import config_label_names, read_label_names

    adapter_dir, _ = read_adapter(args)
    if adapter_dir:
        return read_label_names(adapter_dir), head_num_labels(adapter_dir), f"the adapter {adapter_dir}"
    if not args.model:
        return None, None, "the model"
    from transformers import AutoConfig

    from lorakit.models.embedded import resolve_model_path

    path = resolve_model_path(args.model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None, None, f"the model {args.model}"
    config = AutoConfig.from_pretrained(path)
    names = config_label_names(config)
    return names, len(names) if names else None, f"the model {args.model} (id2label in its config.json)"


# ---- prompts ------------------------------------------------------------------------------------------
def prompt_encoder(tokenizer, template: str = "auto"):
    """The training data's encoder: renders chat messages exactly as training examples were rendered."""
    from lorakit.train.templates import ExampleEncoder

    return ExampleEncoder(tokenizer, template)


def chat_prompt_ids(encoder, messages: list[dict], where: str = "prompt") -> list[int]:
    """Token ids of the conversation so far plus the assistant generation prompt."""
    return encoder.encode_rendered(messages, True, where)


def user_messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def is_main_process() -> bool:
    """False on the other ranks of a torchrun launch (only rank 0 prints)."""
    return os.environ.get("RANK", "0") == "0"
