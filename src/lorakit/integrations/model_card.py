"""The model card (README.md) written next to an adapter by `save_pretrained` and uploaded by `push_to_hub`.

PEFT writes a README.md beside every adapter; so does lorakit. The card says only what is known:

- metadata the Hub reads: `base_model` (when it is a Hub id), `library_name: peft` (the files are PEFT's format,
  so the Hub lists the adapter under its base model and shows PEFT's loading snippet), `tags`, `pipeline_tag`;
- the base model, and for lorakit's embedded copy of it, which weights those are;
- the method and its key settings (those that differ from the defaults, plus the rank, alpha and targets),
  and the trainable parameter count;
- training, when known (`TrainingInfo`): from a `lorakit train` run's files (run_config.yaml,
  train_results.json) or from a transformers/TRL Trainer's state (lorakit.integrations.trainers): the data, the
  trainer, steps, and the final (or best) evaluation metrics;
- how to load it with PEFT and with lorakit.

A README.md that lorakit did not write (no `CARD_MARKER`) is never overwritten: edit the card and remove the
marker line to keep your version.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

CARD_NAME = "README.md"
CARD_MARKER = "<!-- lorakit model card: rewritten on each save; delete this line to keep your own edits -->"
# What the Hub accepts as a model id ("owner/name" or "name"); anything else (a local path) stays out of metadata.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
# Config fields that describe the file, not the method's settings.
NOT_SETTINGS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision"}
# Shown even at their defaults: what a reader looks for first.
KEY_SETTINGS = ("r", "lora_alpha", "target_modules", "init_r", "target_r")
PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation",
                 "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
                 "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction"}
TASK_WORDS = {"CAUSAL_LM": "causal language modelling", "SEQ_2_SEQ_LM": "sequence-to-sequence generation",
              "SEQ_CLS": "sequence classification", "TOKEN_CLS": "token classification",
              "QUESTION_ANS": "extractive question answering", "FEATURE_EXTRACTION": "feature extraction"}
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
TRAIN_RESULTS = "train_results.json"
RUN_CONFIG = "run_config.yaml"


@dataclass
class TrainingInfo:
    """What a model card says about how an adapter was trained; every field is optional (unknown: left out)."""

    trainer: str  # "lorakit train", "transformers Trainer", "trl SFTTrainer", ...
    data: list[str] = field(default_factory=list)  # the training data, as its user named it
    steps: int | None = None  # optimizer steps
    epochs: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # learning rate, batch size, ...
    metrics: dict[str, float] = field(default_factory=dict)  # train loss, final (or best) evaluation metrics
    metrics_note: str = ""  # where the metrics come from, e.g. "best checkpoint (step 40)"


@dataclass
class CardFacts:
    """Everything a card is made from (collected from a PeftModel by `facts_from_model`)."""

    configs: dict[str, Any]  # adapter name -> PeftConfig, the default (or first) adapter first
    base_model: str | None
    embedded_copy: Any = None  # the EmbeddedModel the base weights were loaded from, if any
    trainable_params: int | None = None
    total_params: int | None = None
    training: TrainingInfo | None = None
    repo_id: str | None = None  # where the card will live (push_to_hub), for the loading snippet
    tags: list[str] = field(default_factory=list)


# ---- collecting ----------------------------------------------------------------------------------------------
def facts_from_model(model, adapter_names: list[str], repo_id: str | None = None, tags=()) -> CardFacts:
    """The facts of `model` (a lorakit PeftModel) for the adapters in `adapter_names`."""
    from lorakit.models.embedded import embedded_copy_of

    configs = {name: model.peft_config[name] for name in adapter_names}
    base = model.get_base_model()
    base_name = next((c.base_model_name_or_path for c in configs.values() if c.base_model_name_or_path), None)
    base_name = base_name or getattr(getattr(base, "config", None), "name_or_path", None) or None
    trainable, total = model.get_nb_trainable_parameters()
    if not trainable:  # loaded for inference: count the adapter tensors instead of the (frozen) parameters
        trainable = sum(t.numel() for name in adapter_names for t in model.adapter_state_dict(name).values())
    return CardFacts(configs=configs, base_model=base_name, embedded_copy=embedded_copy_of(base),
                     trainable_params=trainable, total_params=total, training=getattr(model, "training_info", None),
                     repo_id=repo_id, tags=list(tags or ()))


def write_run_card(adapter_dir: str) -> bool:
    """Rewrite the card of a `lorakit train` run's adapter from the run's files, once train_results.json holds the
    final metrics (the trainer calls it last). True when written."""
    from lorakit.adapter_files import read_adapter_config
    from lorakit.models.embedded import embedded_model_for

    training = training_info_from_run(adapter_dir)
    if training is None:
        return False
    results = _read_json(os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), TRAIN_RESULTS)) or {}
    run = _read_yaml(os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), RUN_CONFIG)) or {}
    config = read_adapter_config(adapter_dir)
    facts = CardFacts(configs={"default": config}, base_model=config.base_model_name_or_path,
                      embedded_copy=embedded_model_for(str(run.get("model", ""))),
                      trainable_params=results.get("trainable_params"), total_params=results.get("total_params"),
                      training=training)
    return write_model_card(adapter_dir, facts)


def training_info_from_run(adapter_dir: str) -> TrainingInfo | None:
    """What a `lorakit train` run says about the adapter in `adapter_dir` (its output_dir/adapter): the data and
    options in run_config.yaml, the results in train_results.json; None when the directory is not a run's."""
    run_dir = os.path.dirname(os.path.abspath(adapter_dir))
    results = _read_json(os.path.join(run_dir, TRAIN_RESULTS))
    if not isinstance(results, dict) or os.path.basename(os.path.normpath(adapter_dir)) != "adapter":
        return None
    run = _read_yaml(os.path.join(run_dir, RUN_CONFIG)) or {}
    data, train = run.get("data") or {}, run.get("train") or {}
    described = [f"{os.path.basename(os.path.normpath(str(p)))} (a local file)" for p in
                 (data.get("path"), data.get("val_path")) if p]
    metrics = {"train_loss": results.get("train_loss")}
    metrics.update({f"eval_{k}": v for k, v in (results.get("eval") or {}).items()})
    length = ("max_steps",) if train.get("max_steps") else ("num_epochs",)
    settings = {k: train.get(k) for k in ("learning_rate", "batch_size", "gradient_accumulation_steps", *length,
                                           "lr_scheduler") if train.get(k) is not None}
    return TrainingInfo(trainer="lorakit train", data=described, steps=results.get("steps"), settings=settings,
                        metrics=_numbers(metrics), metrics_note="at the end of training" if results.get("eval") else "")


def training_info_from_trainer(trainer) -> TrainingInfo:
    """What a transformers (or TRL) Trainer knows: its class, the training data, steps, and the evaluation metrics
    of the best checkpoint (load_best_model_at_end) or else the latest evaluation."""
    state, args = trainer.state, trainer.args
    history = list(state.log_history or [])
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    best_step = getattr(state, "best_global_step", None) if args.load_best_model_at_end else None
    chosen = next((h for h in evals if h.get("step") == best_step), None) if best_step else None
    metric = args.metric_for_best_model or "loss"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    note = f"best checkpoint (step {best_step}, by {metric})" if chosen else ""
    if chosen is None and evals:
        chosen, note = evals[-1], f"latest evaluation (step {evals[-1].get('step')})"
    metrics = {k: v for k, v in (chosen or {}).items() if k.startswith("eval_") and not k.endswith(
        ("_runtime", "_per_second"))}
    losses = [h["train_loss"] for h in history if "train_loss" in h] or [h["loss"] for h in history if "loss" in h]
    if losses:
        metrics = {"train_loss": losses[-1], **metrics}
    world = getattr(args, "world_size", 1) or 1
    settings = {"learning_rate": args.learning_rate,
                "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
                "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))}
    return TrainingInfo(trainer=_trainer_name(trainer), data=_dataset_description(trainer.train_dataset),
                        steps=state.global_step or None, epochs=round(state.epoch, 4) if state.epoch else None,
                        settings=settings, metrics=_numbers(metrics), metrics_note=note)


def _trainer_name(trainer) -> str:
    """The trainer's own class (not lorakit's wrapper around it), e.g. "transformers Trainer", "trl SFTTrainer"."""
    for cls in type(trainer).__mro__:
        if not cls.__module__.startswith("lorakit"):
            return f"{cls.__module__.split('.')[0]} {cls.__name__}"
    return type(trainer).__name__


def _dataset_description(dataset) -> list[str]:
    if dataset is None:
        return []
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    config = getattr(info, "config_name", None)
    if name and config and config != "default":
        name = f"{name} ({config})"
    try:
        size = f"{len(dataset):,} examples"
    except TypeError:  # an iterable dataset
        size = "a streamed dataset"
    return [f"{name}, {size}" if name else f"{size} (a dataset without a name)"]


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _read_yaml(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None


# ---- writing -------------------------------------------------------------------------------------------------
def write_model_card(directory: str, facts: CardFacts) -> bool:
    """Write directory/README.md; a README.md lorakit did not write (yours, or a trainer's) keeps its text and gets
    only the metadata that says what the files are (`update_card_metadata`), as PEFT does. True when written."""
    path = os.path.join(directory, CARD_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as fh:
            if CARD_MARKER not in fh.read():
                update_card_metadata(path, facts)
                return False
    tmp = f"{path}.tmp{os.getpid()}"  # through a temporary file and a rename: never half a card
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(render_model_card(facts))
    os.replace(tmp, path)
    return True


def update_card_metadata(path: str, facts: CardFacts) -> None:
    """Set the metadata of the card at `path` that says what the files are (library_name: peft, base_model, the
    adapter's tags and pipeline_tag), keeping the rest of it."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)
    except Exception as err:  # e.g. broken YAML metadata: saving the adapter matters more than tagging its card
        warnings.warn(f"{path}: could not read its metadata ({err}); left as it is", UserWarning, stacklevel=3)
        return
    metadata = _metadata(facts)
    card.data["tags"] = list(dict.fromkeys([*(card.data.get("tags") or []), *metadata.pop("tags")]))
    for key, value in metadata.items():
        if key != "pipeline_tag" or not card.data.get(key):
            card.data[key] = value
    card.save(path)


def _metadata(facts: CardFacts) -> dict:
    """The card's YAML header: what the Hub reads to list the adapter under its base model."""
    config = next(iter(facts.configs.values()))
    hub_base = _hub_id(facts.base_model)
    header = {"library_name": "peft"}
    if hub_base:
        header["base_model"] = hub_base
    tags = [f"base_model:adapter:{hub_base}"] if hub_base else []
    header["tags"] = list(dict.fromkeys([*tags, _method_name(config).lower(), "lorakit", *facts.tags]))
    if str(config.task_type) in PIPELINE_TAGS:
        header["pipeline_tag"] = PIPELINE_TAGS[str(config.task_type)]
    return header


def render_model_card(facts: CardFacts) -> str:
    config = next(iter(facts.configs.values()))
    method = _method_name(config)
    task = str(config.task_type) if config.task_type else None
    base, hub_base = facts.base_model, _hub_id(facts.base_model)
    header = yaml.safe_dump(_metadata(facts), sort_keys=False).rstrip()
    lines = ["---", header, "---", "", CARD_MARKER, ""]
    lines += [f"# {method} adapter" + (f" for {hub_base}" if hub_base else ""), ""]
    lines += _summary(facts, method, task, base, hub_base)
    lines += _method_section(facts)
    if facts.training is not None:
        lines += _training_section(facts.training)
    lines += _loading_section(facts, task, hub_base)
    return "\n".join(lines).rstrip() + "\n"


def _summary(facts: CardFacts, method: str, task: str | None, base: str | None, hub_base: str | None) -> list[str]:
    what = f"A {method} adapter" + (f" for {TASK_WORDS[task]}" if task in TASK_WORDS else "")
    if hub_base:
        where = f" on [{hub_base}](https://huggingface.co/{hub_base})"
    elif base:
        where = f" on the base model `{os.path.basename(os.path.normpath(base))}` (a local directory)"
    else:
        where = " (its base model was not recorded)"
    lines = [f"{what}{where}, made with lorakit. The files are in PEFT's format "
             "(`adapter_config.json` + `adapter_model.safetensors`): it loads with PEFT or lorakit.", ""]
    copy = facts.embedded_copy
    if copy is not None and hub_base == copy.hub_id:
        lines += [f"The base weights it was made on are lorakit's embedded copy of {hub_base} ({copy.copy_description}); "
                  "lorakit resolves this id to that copy, offline. It also loads on the original weights.", ""]
    if len(facts.configs) > 1:
        others = ", ".join(f"`{n}`" for n in list(facts.configs)[1:])
        lines += [f"This repository also holds the adapters {others}, each in the folder of its name.", ""]
    return lines


def _method_section(facts: CardFacts) -> list[str]:
    lines = ["## Method", ""]
    for name, config in facts.configs.items():
        if len(facts.configs) > 1:
            lines += [f"Adapter `{name}`:", ""]
        lines += ["| setting | value |", "|---|---|", f"| method | {_method_name(config)} |"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in _settings(config).items()]
        lines.append("")
    if facts.trainable_params and facts.total_params:
        share = 100 * facts.trainable_params / facts.total_params
        lines += [f"Adapter parameters: {facts.trainable_params:,} ({share:.4g}% of the {facts.total_params:,} "
                  "parameters of the adapted model).", ""]
    lines += ["Every setting is in `adapter_config.json`.", ""]
    return lines


def _training_section(info: TrainingInfo) -> list[str]:
    lines = ["## Training", "", f"- trained with: {info.trainer}"]
    if info.data:
        lines.append(f"- data: {'; '.join(info.data)}")
    if info.steps:
        lines.append(f"- optimizer steps: {info.steps:,}" + (f" ({info.epochs:g} epochs)" if info.epochs else ""))
    lines += [f"- {key.replace('_', ' ')}: {_cell(value)}" for key, value in info.settings.items()]
    lines.append("")
    if info.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in info.metrics.items()]
        lines += ["", f"Evaluation metrics: {info.metrics_note}." if info.metrics_note else "", ""]
    return [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]


def _loading_section(facts: CardFacts, task: str | None, hub_base: str | None) -> list[str]:
    adapter = facts.repo_id or "path/to/this/adapter"
    base = hub_base or "path/to/the/base/model"
    auto = AUTO_CLASSES.get(task or "", "AutoModelForCausalLM")
    lines = ["## How to load", "", "With PEFT:", "", "```python", f"from transformers import {auto}",
             "from peft import PeftModel", "", f'base = {auto}.from_pretrained("{base}")',
             f'model = PeftModel.from_pretrained(base, "{adapter}")', "```", "",
             "With lorakit: the same, with `from lorakit import PeftModel`."]
    if task == "CAUSAL_LM":
        model_option = "" if hub_base else f" --model {base}"
        named = " (the base model is the one `adapter_config.json` names)" if hub_base else ""
        lines[-1] = lines[-1][:-1] + f", or from the command line{named}:"
        lines += ["", "```bash", f'lorakit generate --adapter {adapter}{model_option} --prompt "Hello"', "```"]
    return lines + [""]


def _method_name(config) -> str:
    from lorakit.registry import method_for_config

    method = method_for_config(config)
    return method.display_name or method.name


def _settings(config) -> dict[str, Any]:
    """The config's fields that differ from their defaults, plus KEY_SETTINGS, in declaration order."""
    shown = {}
    for f in dataclasses.fields(config):
        if f.name in NOT_SETTINGS:
            continue
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.name in KEY_SETTINGS or value != default:
            shown[f.name] = value
    return shown


def _cell(value) -> str:
    """A table cell: lists joined, long structures summarised (the config file has them in full)."""
    if isinstance(value, (set, frozenset, tuple)):
        value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, list):
        text = ", ".join(f"`{v}`" if isinstance(v, str) else str(v) for v in value)
        return text if len(value) <= 12 else f"{len(value)} entries"
    if isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
        return f"`{text}`" if len(text) <= 120 else f"{len(value)} entries"
    if isinstance(value, str):
        return f"`{value}`"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub model id (not a path of this machine), else None."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or not HUB_ID.match(name):
        return None
    return name
