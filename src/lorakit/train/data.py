"""Training data: config, loading and splitting, tokenisation with loss masks, collation and packing.

    cfg = DataConfig(path="data/alpaca.json")                      # format detected from the keys
    train, val, info = build_datasets(cfg, tokenizer, "CAUSAL_LM")  # lists of {"input_ids", "labels", ...}
    collate = make_collator(cfg, tokenizer)                         # list of examples -> padded tensors
    prompts = generation_prompts(load_splits(cfg).val, tokenizer, cfg.template)  # for eval by generate()

Packed rows (cfg.packing) must go through the model with `use_cache=False`: see packing.py.
Formats: data_formats.py. Files: data_files.py. Templates and masking: templates.py.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field

from lorakit.config import check_choice, check_positive
from lorakit.tasks import TRAINABLE_TASK_TYPES
from lorakit.train.data_checks import Finding, suspect_data
from lorakit.train.data_files import Origin, read_rows
from lorakit.train.data_formats import (
    FORMATS, Chat, Completion, Labelled, Record, Text, detect_format, label_id, label_names_for, normalise_rows,
)
from lorakit.train.packing import DataCollator, pack_examples
from lorakit.train.templates import IGNORE_INDEX, TEMPLATES, ExampleEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    # Training data: a .json/.jsonl/.csv/.parquet file, or a folder written by datasets' save_to_disk.
    path: str
    # Record format: auto (detect from the first record's keys), alpaca, messages, sharegpt, prompt_completion,
    # text (language modelling), text_label (sequence classification).
    format: str = "auto"
    # Separate validation file, read with the same format as the training data.
    val_path: str | None = None
    # Validation taken out of the training data: a fraction in (0, 1) or a number of records; 0 = none.
    val_size: float | int = 0
    # Maximum tokens per example; longer examples are truncated on the right.
    cutoff_len: int = 1024
    # Also compute the loss on prompt/user tokens, not only on the assistant's answers.
    train_on_inputs: bool = False
    # Pad batches to a multiple of this many tokens (tensor-core friendly); None = longest in batch.
    pad_to_multiple_of: int | None = 8
    # Pack several examples into each training row (padding-free, position_ids restart per example).
    packing: bool = False
    # Use only the first N training records (before any validation split).
    max_samples: int | None = None
    # Seed of the validation split and of packing.
    shuffle_seed: int = 42
    # System message prepended to every conversation that has none.
    system_prompt: str | None = None
    # Chat template: auto (the tokenizer's, else the Alpaca-style fallback), tokenizer, alpaca.
    template: str = "auto"
    # text / text_label formats: column holding the text.
    text_field: str = "text"
    # text_label format: column holding the label (an int class id or a string class name).
    label_field: str = "label"

    def __post_init__(self) -> None:
        owner = "DataConfig"
        for name in ("path", "val_path"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"{owner}.{name} must be a file or folder path, got {value!r}")
        if self.path is None:
            raise ValueError(f"{owner}.path is required: the training data file or folder")
        check_choice(owner, "format", self.format, FORMATS)
        check_choice(owner, "template", self.template, TEMPLATES)
        self._check_val_size()
        check_positive(owner, "cutoff_len", self.cutoff_len, integer=True)
        if self.pad_to_multiple_of is not None:
            check_positive(owner, "pad_to_multiple_of", self.pad_to_multiple_of, integer=True)
        if self.max_samples is not None:
            check_positive(owner, "max_samples", self.max_samples, integer=True)
        for name in ("train_on_inputs", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int):
            raise ValueError(f"{owner}.shuffle_seed must be an integer, got {self.shuffle_seed!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"{owner}.system_prompt must be a string or None, got {self.system_prompt!r}")
        for name in ("text_field", "label_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name} must be a non-empty column name, got {getattr(self, name)!r}")

    def _check_val_size(self) -> None:
        size = self.val_size
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ValueError(f"DataConfig.val_size must be a fraction in (0, 1) or a record count, got {size!r}")
        if isinstance(size, float) and not (0 <= size < 1 or size.is_integer()):
            raise ValueError(f"DataConfig.val_size={size!r}: a fraction must be in (0, 1); a count must be an int")
        if isinstance(size, float) and size >= 1:
            object.__setattr__(self, "val_size", int(size))  # 100.0 from YAML means 100 records
        if self.val_size < 0:
            raise ValueError(f"DataConfig.val_size must be >= 0, got {size!r}")
        if self.val_size and self.val_path is not None:
            raise ValueError(
                f"DataConfig: set either val_path ({self.val_path!r}) or val_size ({size!r}), not both"
            )


@dataclass
class Splits:
    """Normalised records before tokenisation (also what evaluation by generation starts from)."""

    train: list[Record]
    val: list[Record]
    format: str
    label_names: list[str] | None  # text_label only: class names in id order
    val_source: str | None  # "val_path", "val_size", "<path>[validation]" or None
    train_origins: list[Origin] = field(default_factory=list)  # where each record comes from (file, line)
    val_origins: list[Origin] = field(default_factory=list)


@dataclass(frozen=True)
class DataInfo:
    format: str  # the format used (detected when cfg.format == "auto")
    template: str | None  # "tokenizer" (its chat template) or "alpaca" (fallback); None for text_label
    num_train: int  # training examples kept
    num_val: int  # validation examples kept
    num_train_rows: int  # rows the trainer iterates: packed rows when packing, else num_train
    dropped_train: int  # examples dropped because every label was masked after truncation
    dropped_val: int
    truncated_train: int  # examples cut to cutoff_len
    truncated_val: int
    skipped_turns: int  # assistant turns left untrained: the template renders them differently in a prefix
    train_tokens: int  # total tokens in the kept training examples
    label_names: tuple[str, ...] | None  # text_label: class names in id order
    val_source: str | None
    findings: tuple[Finding, ...] = ()  # suspect data (data_checks.py), also logged as warnings
    longest_train: int = 0  # tokens of the longest training example before truncation


@dataclass(frozen=True)
class GenerationPrompt:
    index: int  # position of the record in the list given
    prompt_ids: list[int]  # tokens to feed model.generate, ending with the assistant generation prompt
    reference: str  # the expected answer text


def load_splits(cfg: DataConfig, label_names=None) -> Splits:
    """Read, detect the format, normalise and split into train / validation records.

    label_names: the classes fixed elsewhere (a trained classifier being evaluated): text_label records are
    mapped to them by name. Default: the training data's own classes (see label_names_for)."""
    loaded = read_rows(cfg.path)
    if not loaded.rows:
        raise ValueError(f"The training data {cfg.path!r} has no records. Check the file (and the split saved).")
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(loaded.rows[0], cfg.path, cfg.text_field, cfg.label_field)
    rows = loaded.rows[: cfg.max_samples] if cfg.max_samples else loaded.rows
    origins = loaded.origins(cfg.path)[: len(rows)]
    train = _normalise(rows, fmt, cfg.path, cfg, origins)
    val, val_origins, val_source = [], [], None
    if cfg.val_path is not None:
        val_loaded = read_rows(cfg.val_path)
        if not val_loaded.rows:
            raise ValueError(f"The validation data {cfg.val_path!r} has no records.")
        val_origins = val_loaded.origins(cfg.val_path)
        val, val_source = _normalise(val_loaded.rows, fmt, cfg.val_path, cfg, val_origins), "val_path"
    elif cfg.val_size:
        train_ids, val_ids = split_indices(len(train), cfg.val_size, cfg.shuffle_seed)
        train, val = [train[i] for i in train_ids], [train[i] for i in val_ids]
        origins, val_origins = [origins[i] for i in train_ids], [origins[i] for i in val_ids]
        val_source = "val_size"
    elif loaded.val_rows:
        where = f"{cfg.path}[{loaded.val_split_name}]"
        val_origins = loaded.origins(cfg.path, val=True)
        val, val_source = _normalise(loaded.val_rows, fmt, where, cfg, val_origins), where
    if fmt == "text_label":
        label_names = [str(n) for n in label_names] if label_names is not None else label_names_for(train)
    else:
        label_names = None
    return Splits(train=train, val=val, format=fmt, label_names=label_names, val_source=val_source,
                  train_origins=origins, val_origins=val_origins)


def _normalise(rows: list[dict], fmt: str, source: str, cfg: DataConfig, origins: list[Origin]) -> list[Record]:
    return normalise_rows(rows, fmt, source, cfg.text_field, cfg.label_field, cfg.system_prompt,
                          [str(o) for o in origins])


def split_indices(n: int, val_size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices in their original order, validation indices in shuffled order): the validation part is
    ceil(val_size * n) records (or val_size records) from a seeded shuffle."""
    count = math.ceil(val_size * n) if isinstance(val_size, float) else val_size
    if count >= n:
        raise ValueError(
            f"val_size={val_size!r} takes {count} of the {n} training records and leaves none to train on; "
            "use a smaller val_size or a separate val_path."
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:count])
    return [i for i in range(n) if i not in val_ids], order[:count]


def build_datasets(cfg: DataConfig, tokenizer, task_type: str = "CAUSAL_LM", label_names=None,
                   classes_of: str = "the training data") -> tuple[list[dict], list[dict], DataInfo]:
    """(train examples, validation examples, info). Examples are dicts of Python lists:

    CAUSAL_LM: input_ids, labels (-100 = no loss); packed train rows also carry position_ids.
    SEQ_CLS (text_label data): input_ids, labels = class id (by name among `label_names`, the classes of
    `classes_of`; default the training data's own classes).
    The validation examples are never packed. Batch them with `make_collator(cfg, tokenizer)`.
    Suspect data (data_checks.py) is logged as warnings and kept in info.findings.
    """
    task = str(task_type)
    check_choice("build_datasets", "task_type", task, TRAINABLE_TASK_TYPES)
    splits = load_splits(cfg, label_names)
    if (task == "SEQ_CLS") != (splits.format == "text_label"):
        raise ValueError(
            f"task_type {task} does not fit {splits.format!r} data: SEQ_CLS trains on text_label data "
            "(text + label), CAUSAL_LM on every other format."
        )
    if cfg.packing and task == "SEQ_CLS":
        raise ValueError("packing=True applies to causal LM training only; set packing=False for text_label data")
    encoder = ExampleEncoder(tokenizer, cfg.template, cfg.train_on_inputs)
    train, dropped_train, cut_train, longest = _tokenize_split(splits.train, splits.train_origins, encoder, cfg,
                                                               splits.label_names, cfg.path, classes_of)
    val_where = cfg.val_path if splits.val_source == "val_path" else f"validation ({splits.val_source})"
    val, dropped_val, cut_val, _ = _tokenize_split(splits.val, splits.val_origins, encoder, cfg, splits.label_names,
                                                   val_where, classes_of)
    rows = pack_examples(train, cfg.cutoff_len, cfg.shuffle_seed) if cfg.packing else train
    findings = suspect_data(splits, cfg.cutoff_len, cut_train, cut_val)
    info = DataInfo(
        format=splits.format, template=None if task == "SEQ_CLS" else encoder.template,
        num_train=len(train), num_val=len(val), num_train_rows=len(rows),
        dropped_train=dropped_train, dropped_val=dropped_val,
        truncated_train=len(cut_train), truncated_val=len(cut_val), skipped_turns=encoder.skipped_turns,
        train_tokens=sum(len(ex["input_ids"]) for ex in train),
        label_names=tuple(splits.label_names) if splits.label_names else None, val_source=splits.val_source,
        findings=tuple(findings), longest_train=longest,
    )
    logger.info("data: %s", info)
    for finding in findings:
        logger.warning("%s", finding)
    if encoder.skipped_turns:
        logger.warning(
            "%d assistant turns get no loss: the chat template renders them differently when they are not the "
            "last turn (e.g. it drops reasoning from history). Only turns rendered identically are trained.",
            encoder.skipped_turns,
        )
    return rows, val, info


def _tokenize_split(records: list[Record], origins: list[Origin], encoder: ExampleEncoder, cfg: DataConfig,
                    label_names, source: str, classes_of: str):
    """(examples, number dropped, origins of the examples cut by cutoff_len, longest length before the cut).
    Drops examples left with no trained label."""
    examples, dropped, cut, longest, shortest_prompt = [], 0, [], 0, None
    for index, record in enumerate(records):
        where = str(origins[index]) if index < len(origins) else f"{source}, record {index}"
        if isinstance(record, Labelled):
            ex = encoder.labelled(record, label_id(record.label, label_names, where, classes_of), cfg.cutoff_len)
            full = len(ex["input_ids"]) if len(ex["input_ids"]) < cfg.cutoff_len else encoder.labelled_length(record)
            longest = max(longest, full)
            if full > cfg.cutoff_len:
                cut.append(origins[index] if index < len(origins) else where)
            examples.append(ex)
            continue
        ex = _encode(record, encoder, where)
        longest = max(longest, len(ex["input_ids"]))
        if len(ex["input_ids"]) > cfg.cutoff_len:
            if any(label != IGNORE_INDEX for label in ex["labels"][cfg.cutoff_len:]):  # trained tokens are lost
                cut.append(origins[index] if index < len(origins) else where)
            ex = {"input_ids": ex["input_ids"][: cfg.cutoff_len], "labels": ex["labels"][: cfg.cutoff_len]}
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            dropped += 1
            prompt_len = _masked_prefix_len(_encode(record, encoder, where)["labels"])
            shortest_prompt = prompt_len if shortest_prompt is None else min(shortest_prompt, prompt_len)
            continue
        examples.append(ex)
    if records and not examples:
        raise ValueError(
            f"{source}: every label is masked in all {len(records)} examples: cutoff_len={cfg.cutoff_len} is "
            f"shorter than the prompts? (the shortest prompt has {shortest_prompt} tokens), or no record has an "
            "assistant answer to train on. Raise cutoff_len, shorten the prompts, or set train_on_inputs=True."
        )
    if dropped:
        logger.warning("%s: dropped %d of %d examples with no trained token left (cutoff_len=%d)",
                       source, dropped, len(records), cfg.cutoff_len)
    return examples, dropped, cut, longest


def _encode(record: Record, encoder: ExampleEncoder, where: str) -> dict:
    if isinstance(record, Chat):
        return encoder.chat(record, where)
    if isinstance(record, Completion):
        return encoder.completion(record)
    return encoder.text(record)


def _masked_prefix_len(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def make_collator(cfg: DataConfig, tokenizer) -> DataCollator:
    """Right-padding collator (handles packed rows too). Pads with the pad token, else EOS."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token")
    return DataCollator(pad_token_id=pad_id, pad_to_multiple_of=cfg.pad_to_multiple_of)


def generation_prompts(records: list[Record], tokenizer, template: str = "auto") -> list[GenerationPrompt]:
    """For evaluation by generation: prompt ids (built exactly as in training) and the reference answer.

    Conversations give the turns before the LAST assistant turn plus the assistant generation prompt;
    raw prompt_completion records give BOS + prompt. Conversations without an assistant turn are skipped.
    """
    encoder = ExampleEncoder(tokenizer, template)
    prompts = []
    for index, record in enumerate(records):
        if isinstance(record, (Text, Labelled)):
            raise ValueError(
                f"generation prompts need prompt/answer data; record {index} is {type(record).__name__} "
                "(text or text_label format). Evaluate these by loss or accuracy instead."
            )
        found = encoder.generation_prompt(record, f"record {index}")
        if found is not None:
            prompts.append(GenerationPrompt(index=index, prompt_ids=found[0], reference=found[1]))
    return prompts
