"""Show how training will see the data, without loading the model's weights (only its tokenizer).

    lorakit data run.yaml                          # the run config's data, model (tokenizer) and batch settings
    lorakit data run.yaml data.cutoff_len=256 --show 5 --tokens
    lorakit data --model smollm2 --data data/train.jsonl
    lorakit train run.yaml --dry-run               # the same report, then stop

Prints: the format, records and splits, the template, token counts and lengths (and how many examples
cutoff_len cuts), trained tokens (the loss is on the answers only unless train_on_inputs), steps per epoch,
class counts for classification data, the first examples rendered exactly as trained with the trained
tokens between ⟦ and ⟧ (--tokens: token by token), and every suspect-data warning (empty answers, answers
cut by cutoff_len, validation records also in training, label sets that differ between splits, class-id
gaps) with line numbers. Exit code 0, also with warnings; 1 when the data cannot be trained on at all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import statistics
from collections import Counter

from lorakit.train.data_formats import FORMATS
from lorakit.train.templates import TEMPLATES

TRAINED_START, TRAINED_END = "⟦", "⟧"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML run config (or give --data and --model)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, as for train")
    quick = parser.add_argument_group("without a run config")
    quick.add_argument("--data", metavar="FILE", help="the training data file")
    quick.add_argument("--model", metavar="M", help="the model whose tokenizer renders the data")
    quick.add_argument("--format", choices=FORMATS, default=None, help="record format (default: detected)")
    quick.add_argument("--task-type", choices=("CAUSAL_LM", "SEQ_CLS"), default=None,
                       help="default: SEQ_CLS for text_label data, else CAUSAL_LM")
    quick.add_argument("--cutoff-len", type=int, default=None, metavar="N", help="maximum tokens per example")
    quick.add_argument("--template", choices=TEMPLATES, default=None, help="chat template (default auto)")
    show = parser.add_argument_group("report")
    show.add_argument("--show", type=int, default=2, metavar="N", help="examples to render (default 2)")
    show.add_argument("--tokens", action="store_true", help="also list the examples token by token")


def run(args: argparse.Namespace) -> int:
    if args.show < 0:
        raise ValueError(f"--show must be 0 or more, got {args.show}")
    data_cfg, model, task_type, batch = resolve(args)
    print(data_report(data_cfg, model, task_type, batch, show=args.show, tokens=args.tokens))
    return 0


def resolve(args: argparse.Namespace):
    """(DataConfig, model name, task type, (batch_size, gradient_accumulation_steps) or None)."""
    from lorakit.train.config import load_run_config
    from lorakit.train.data import DataConfig

    quick = {name: getattr(args, name) for name in ("format", "cutoff_len", "template") if getattr(args, name)}
    if args.config:
        if args.data or args.model:
            raise ValueError("give a run config, or --data and --model, not both (override the config's values "
                             "with key=value, e.g. data.path=other.jsonl)")
        cfg = load_run_config(args.config, [*args.overrides, *(f"data.{k}={v}" for k, v in quick.items())])
        return cfg.data, cfg.model, args.task_type or cfg.task_type, (cfg.train.batch_size,
                                                                      cfg.train.gradient_accumulation_steps)
    if args.overrides or not (args.data and args.model):
        raise ValueError("give a run config (lorakit data run.yaml), or both --data FILE and --model M")
    return DataConfig(path=args.data, **quick), args.model, args.task_type, None


def data_report(data_cfg, model: str, task_type: str | None, batch, show: int = 2, tokens: bool = False) -> str:
    """The whole report as text (see the module docstring). Reads the tokenizer, never the weights."""
    from lorakit.models.loading import load_tokenizer
    from lorakit.train.data import build_datasets, load_splits
    from lorakit.train.packing import pack_examples

    splits = load_splits(data_cfg)
    task = task_type or ("SEQ_CLS" if splits.format == "text_label" else "CAUSAL_LM")
    tokenizer = load_tokenizer(model)
    with _quiet("lorakit.train.data"):  # its warnings are part of this report
        train, val, info = build_datasets(dataclasses.replace(data_cfg, packing=False), tokenizer, task)
    lines = [f"data: {data_cfg.path} ({splits.format}{', detected' if data_cfg.format == 'auto' else ''}): "
             f"{info.num_train} training and {info.num_val} validation examples"
             + (f" ({info.val_source})" if info.val_source else "")
             + (f"; {info.dropped_train} dropped (no trained token left)" if info.dropped_train else "")]
    lengths = [len(ex["input_ids"]) for ex in train]
    rows = len(pack_examples(train, data_cfg.cutoff_len, data_cfg.shuffle_seed)) if data_cfg.packing else len(train)
    lines.append(f"tokens per example: min {min(lengths)}, median {statistics.median(lengths):g}, max "
                 f"{info.longest_train} before the cut at data.cutoff_len={data_cfg.cutoff_len} "
                 f"({info.truncated_train} cut); {sum(lengths)} tokens in all")
    if task == "SEQ_CLS":
        lines += _class_lines(info, train, val)
    else:
        trained = sum(sum(1 for label in ex["labels"] if label != -100) for ex in train)
        where = "every token" if data_cfg.train_on_inputs else "the answers only (train_on_inputs: false)"
        lines.append(f"template: {_template_name(info.template)}; loss on {where}: {trained} of {sum(lengths)} "
                     f"tokens trained ({100 * trained / max(sum(lengths), 1):.1f}%)")
    packing = f"packed into {rows} rows of up to {data_cfg.cutoff_len} tokens" if data_cfg.packing else "not packed"
    line = f"training rows: {rows} ({packing})"
    if batch:
        global_batch = batch[0] * batch[1]
        line += (f"; {math.ceil(rows / global_batch)} steps per epoch at a global batch of {global_batch} "
                 f"(batch_size {batch[0]} x gradient_accumulation_steps {batch[1]}, one process)")
    lines.append(line)
    for number, example in enumerate(train[:show], start=1):
        lines += ["", *_render_example(tokenizer, example, number, len(train), task, info, tokens)]
    lines += ["", f"warnings: {len(info.findings)}" if info.findings else "warnings: none"]
    lines += [f"  - {finding}" for finding in info.findings]
    if info.skipped_turns:
        lines.append(f"  - {info.skipped_turns} assistant turns get no loss: the chat template renders them "
                     "differently when they are not the last turn")
    return "\n".join(lines)


def _template_name(template: str | None) -> str:
    return {"tokenizer": "the tokenizer's chat template", "alpaca": "the Alpaca-style fallback (### Instruction / "
            "### Response)"}.get(template, str(template))


def _class_lines(info, train, val) -> list[str]:
    names = list(info.label_names or [])
    counts = Counter(ex["labels"] for ex in train)
    val_counts = Counter(ex["labels"] for ex in val)
    described = ", ".join(f"{i} = {name!r}: {counts.get(i, 0)}" + (f" / {val_counts.get(i, 0)}" if val else "")
                          for i, name in enumerate(names))
    return [f"classes ({len(names)}; training{' / validation' if val else ''} examples): {described}"]


def _render_example(tokenizer, example: dict, number: int, total: int, task: str, info, tokens: bool) -> list[str]:
    ids, labels = example["input_ids"], example["labels"]
    if task == "SEQ_CLS":
        name = (info.label_names or [])[labels] if info.label_names else labels
        return [f"example {number} of {total}: {len(ids)} tokens, class {labels} ({name!r})",
                "  " + tokenizer.decode(ids)]
    trained = [label != -100 for label in labels]
    head = (f"example {number} of {total}: {len(ids)} tokens, {sum(trained)} trained "
            f"(between {TRAINED_START} and {TRAINED_END})")
    text, start = "", 0
    for end in range(1, len(ids) + 1):  # decode runs of equally trained tokens, marking the trained runs
        if end == len(ids) or trained[end] != trained[start]:
            piece = tokenizer.decode(ids[start:end])
            text += f"{TRAINED_START}{piece}{TRAINED_END}" if trained[start] else piece
            start = end
    out = [head, *("  " + line for line in text.splitlines())]
    if tokens:
        out.append("  position  id      trained  token")
        out += [f"  {i:<9} {token_id:<7} {'yes' if is_trained else '-':<8} {tokenizer.decode([token_id])!r}"
                for i, (token_id, is_trained) in enumerate(zip(ids, trained))]
    return out


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
