"""Load a base model and its tokenizer from an embedded alias, a local directory or a Hub id.

    model, tokenizer = load_model_and_tokenizer("smollm2")                       # embedded, offline
    model, tokenizer = load_model_and_tokenizer("minilm", "SEQ_CLS", label_names=["neg", "pos"])
    model, tokenizer = load_model_and_tokenizer("./my-base-model", dtype="bfloat16")
    model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-0.5B")            # Hub (needs network)
    model, tokenizer = load_model_and_tokenizer("smollm2", quantization="nf4")  # linear weights in NF4 (QLoRA)

Failures a user can fix (a path that does not exist, a Hub id that cannot be fetched, a model that does not
fit the task) raise `FileNotFoundError` / `ValueError` saying what was tried and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit.adapter_files import RUN_MODEL_SUBDIR
from lorakit.methods.quant import check_quantization, quantize_model, resolve_compute_dtype
from lorakit.models.embedded import ALIAS_HELP, embedded_model_for, record_embedded_copy, resolve_model_path
from lorakit.models.half_from_fp32 import load_half_from_fp32
from lorakit.models.stored_bf16 import load_stored_bf16, to_fp32

# PEFT's task type names -> the transformers Auto class that builds the matching head.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
}
# None means fp32: the safe choice for training (bf16/fp16 weights would also make the optimizer state
# low precision); pass "auto" to keep the checkpoint's own dtype.
DTYPES: dict[str | None, torch.dtype | str] = {
    None: torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
# What the Hub accepts as a model id: "name" or "owner/name" (letters, digits, "-", "_", ".").
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
WHAT_TO_DO = f"use a local model directory, or one of the embedded aliases: {ALIAS_HELP}"


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    task_type: str = "CAUSAL_LM",
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantization: str | None = None,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    bf16_as_stored: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)`, with a pad token set, on `device` (default: `default_device()`).

    name_or_path: "smollm2" / "minilm" (embedded), a local directory (or a .gguf file; or a training run's
        output_dir holding model/), or a Hub id.
    task_type: "CAUSAL_LM", "SEQ_2_SEQ_LM" or "SEQ_CLS" (a fresh classification head for SEQ_CLS).
    num_labels / label_names: SEQ_CLS only; label_names also fills config.id2label / label2id.
    dtype: None (float32), "float32", "bfloat16", "float16", "auto" (the checkpoint's dtype), or a
        torch.dtype. With quantization, the dtype of the layers that stay dense (and of a merged model). bf16 /
        fp16 from an fp32 checkpoint: cast weight by weight from the mapped file, whose pages go back as it goes
        (models/half_from_fp32.py; the same model as transformers' own load, at about half its peak memory).
    quantization: None (dense), or "nf4": every linear layer but the output head stored in 4-bit NormalFloat
        (QLoRA; lorakit.methods.quant), quantized on the CPU before the move to `device`.
    double_quant / compute_dtype: NF4 options (quantize_model): 8-bit scales (4.127 instead of 4.5 bits per
        weight); the matmul dtype (default bfloat16).
    bf16_as_stored: with the default fp32, a checkpoint whose weights are all bf16 keeps them as stored, in bf16
        (views of the mapped file, no fp32 copies; models/stored_bf16.py), for a caller that stores its frozen
        weights in bf16 anyway and gives the others fp32 (the trainer's bf16 adapter runs). Without it such a
        checkpoint also loads as stored, to be quantized from the file (the same codes) and to get fp32 weight by
        weight, each one's pages of the file given back as it goes: the fp32 model, without the file beside it.
    """
    task_type = _check_task_type(task_type)
    auto_class = TASK_AUTO_CLASSES[task_type]
    head_kwargs = _classification_kwargs(task_type, num_labels, label_names)
    torch_dtype = _check_dtype(dtype)
    if quantization is not None:  # bad options fail before the (slow) loading
        check_quantization(quantization)
        resolve_compute_dtype(compute_dtype)
    elif compute_dtype is not None:
        raise ValueError(f"compute_dtype={compute_dtype!r} only applies to a quantized model; set quantization='nf4' "
                         "or leave compute_dtype out")
    source, source_kwargs = _locate(name_or_path)

    config = _load_config(name_or_path, source, source_kwargs)
    try:
        model = None  # fp32 from a bf16 file: its weights as stored, then fp32 one by one (models/stored_bf16.py)
        if torch_dtype == torch.float32:
            model = load_stored_bf16(auto_class, source, source_kwargs, head_kwargs)
        kept_bf16 = model is not None
        if model is None and quantization is None:  # bf16 / fp16 from an fp32 file, its pages given back as it goes
            model = load_half_from_fp32(auto_class, source, source_kwargs, head_kwargs, torch_dtype)
        if model is None:
            model = auto_class.from_pretrained(source, dtype=torch_dtype, **source_kwargs, **head_kwargs)
    except SafetensorError as err:  # a weights file cut short or overwritten
        raise ValueError(f"cannot load '{name_or_path}': a weights file in {source} is not a readable safetensors "
                         f"file ({err}); the model was not fully downloaded or copied, or is damaged: fetch it "
                         "again") from None
    except ValueError as err:  # transformers' "Unrecognized configuration class ..." and friends
        raise ValueError(
            f"cannot load '{name_or_path}' (model_type '{config.model_type}') with task_type="
            f"'{task_type}': {_first_line(err)}. CAUSAL_LM needs a decoder (GPT, Llama, "
            f"...), SEQ_2_SEQ_LM an encoder-decoder (T5, BART), SEQ_CLS any model with a classification head."
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(source, **source_kwargs)
    _ensure_pad_token(model, tokenizer)
    embedded = embedded_model_for(name_or_path)
    if embedded is not None:  # adapters then name the base by Hub id, not by this machine's cache path
        record_embedded_copy(model, embedded)
    if quantization is not None:
        quantize_model(model, quantization, double_quant=double_quant, compute_dtype=compute_dtype,
                       weight_dtype=torch.float32 if kept_bf16 else None)
    if kept_bf16 and not bf16_as_stored:
        to_fp32(model)  # every weight (the layers that stay dense when quantized) as the fp32 load gives it
    return model.to(torch.device(device) if device is not None else default_device()), tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer alone, with the pad token load_model_and_tokenizer would set; no model weights are read
    (the embedded SmolLM2's tokenizer comes from its GGUF file when it has not been converted yet)."""
    from lorakit.models.embedded import converted_model_dir, is_complete, package_asset

    embedded = embedded_model_for(name_or_path)
    if embedded is not None and embedded.needs_conversion and not is_complete(converted_model_dir(embedded)):
        asset = package_asset(embedded)
        source, source_kwargs = str(asset.parent), {"gguf_file": asset.name}
    else:
        source, source_kwargs = _locate(name_or_path)
        _load_config(name_or_path, source, source_kwargs)  # one clear error for a Hub id that cannot be fetched
    tokenizer = AutoTokenizer.from_pretrained(source, **source_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_task_type(task_type: Any) -> str:
    """Accept PEFT-style names in any case, or an enum whose `.value` is such a name."""
    name = str(getattr(task_type, "value", task_type)).strip().upper()
    if name not in TASK_AUTO_CLASSES:
        raise ValueError(f"task_type={task_type!r} is not supported; use one of {sorted(TASK_AUTO_CLASSES)}")
    return name


def _check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        allowed = ", ".join(repr(key) for key in DTYPES)
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {allowed} or a torch.dtype")
    return DTYPES[dtype]


def _classification_kwargs(
    task_type: str, num_labels: int | None, label_names: Sequence[str] | None
) -> dict[str, Any]:
    """from_pretrained kwargs for the classification head (empty for the other task types)."""
    if task_type != "SEQ_CLS":
        if num_labels is not None or label_names is not None:
            raise ValueError(f"num_labels / label_names only apply to task_type='SEQ_CLS', not '{task_type}'")
        return {}
    if label_names is not None:
        label_names = [str(name) for name in label_names]
        if len(label_names) < 1 or len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names={label_names!r}: expected at least one label, all different")
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(
                f"num_labels={num_labels} but label_names has {len(label_names)} names; give one or make them agree"
            )
        num_labels = len(label_names)
    if num_labels is None:
        return {}  # the checkpoint's own head size (transformers' default: 2)
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"num_labels={num_labels!r}: expected a positive integer")
    kwargs: dict[str, Any] = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if label_names is not None:  # a head of the requested size replaces any existing one
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    return kwargs


def _locate(name_or_path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(what to pass to from_pretrained, extra kwargs); raises FileNotFoundError for a missing local path."""
    resolved = resolve_model_path(name_or_path)
    path = Path(resolved).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # transformers dequantizes GGUF files on load
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").is_file() and (path / RUN_MODEL_SUBDIR / "config.json").is_file():
        path = path / RUN_MODEL_SUBDIR  # a training run's output_dir whose result is a whole model
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = (
                " It holds an adapter (adapter_config.json): load its base model and then the adapter."
                if (path / "adapter_config.json").is_file() else " Point at the directory that holds config.json."
            )
            raise FileNotFoundError(f"'{path}' is a directory but has no config.json, so it is not a model.{hint}")
        return str(path), {}
    if path.exists():
        raise FileNotFoundError(f"'{path}' is a file; expected a model directory (config.json + weights) or a .gguf")
    if embedded_model_for(name_or_path) is None and not HUB_ID_PATTERN.match(resolved):
        raise FileNotFoundError(f"model path '{resolved}' does not exist; {WHAT_TO_DO}")
    return resolved, {}


def _load_config(name_or_path: str | os.PathLike, source: str, source_kwargs: dict[str, str]):
    """Load the config first: a cheap call that turns Hub failures into one clear error."""
    try:
        return AutoConfig.from_pretrained(source, **source_kwargs)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise
        raise ValueError(
            f"could not load model '{name_or_path}': it is not an embedded alias or a local directory, and "
            f"fetching it from the HuggingFace Hub failed ({type(err).__name__}: {_first_line(err)}). "
            f"If you are offline, {WHAT_TO_DO}."
        ) from err


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; decoder-only checkpoints often ship without one, so reuse EOS."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sequence classification on a decoder finds each row's last token via config.pad_token_id.
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
