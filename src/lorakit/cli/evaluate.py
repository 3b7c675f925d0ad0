"""Score a base model, and an adapter on it, on one data file: base and adapter side by side.

    lorakit eval --model smollm2 --data data/val.jsonl
    lorakit eval --model smollm2 --adapter runs/my-run/adapter --data data/val.jsonl --output results.json

Prompt/answer data (alpaca, messages, sharegpt, prompt_completion): ROUGE-1/2/L/Lsum and exact match of
greedy answers to every prompt, and the loss / perplexity of the reference answers (answer tokens only).
Text data: loss and perplexity. text_label data (a SEQ_CLS model): accuracy and loss; the data's labels are
matched by name to the classes the adapter was trained with (its labels.json; id2label for a full model), so the
evaluation data may hold any subset of them, a single class included. A label the classifier does not know is
an error.
The base model is loaded once; its numbers come from the same model with the adapter switched off.
Prompts are rendered with the same template code as in training. --output writes the numbers and every
generated answer as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import logging

from lorakit.cli.common import (
    add_model_arguments, check_output_file, check_positive_option, classifier_classes, load_model,
)
from lorakit.train.data_formats import FORMATS
from lorakit.train.templates import TEMPLATES

logger = logging.getLogger(__name__)
ROWS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"),
        ("exact_match", "exact match"), ("accuracy", "accuracy"), ("loss", "loss"), ("perplexity", "perplexity"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="FILE",
                      help="evaluation data: .json/.jsonl/.csv/.parquet or a datasets.save_to_disk folder")
    data.add_argument("--format", choices=FORMATS, default="auto", help="record format (default: detected)")
    data.add_argument("--max-samples", type=int, default=None, metavar="N", help="use only the first N records")
    data.add_argument("--cutoff-len", type=int, default=1024, metavar="N",
                      help="truncate examples to N tokens for the loss (default 1024)")
    data.add_argument("--template", choices=TEMPLATES, default="auto",
                      help="chat template, as in training (default auto)")
    data.add_argument("--system", metavar="TEXT",
                      help="system message for records without one, as data.system_prompt in training")
    run_group = parser.add_argument_group("evaluation")
    run_group.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                           help="most tokens generated per answer (default 64)")
    run_group.add_argument("--batch-size", type=int, default=8, metavar="N", help="batch size (default 8)")
    run_group.add_argument("--no-generate", action="store_true", help="skip generation: loss (or accuracy) only")
    run_group.add_argument("--output", metavar="FILE", help="write the results and generated answers as JSON")


def run(args: argparse.Namespace) -> int:
    from lorakit.train.data import DataConfig, build_datasets, generation_prompts, load_splits, make_collator

    for name in ("max_samples", "max_new_tokens", "batch_size", "cutoff_len"):
        check_positive_option(f"--{name.replace('_', '-')}", getattr(args, name))
    check_output_file(args.output)
    data_cfg = DataConfig(path=args.data, format=args.format, max_samples=args.max_samples,
                          cutoff_len=args.cutoff_len, template=args.template, system_prompt=args.system)
    splits = load_splits(data_cfg)  # bad data fails before the model is loaded
    task = "SEQ_CLS" if splits.format == "text_label" else "CAUSAL_LM"
    label_names, classes_of = classes_for_data(args, splits) if task == "SEQ_CLS" else (None, "the data")
    loaded = load_model(args, task, label_names=label_names,
                        why=f"{splits.format!r} data (text_label: SEQ_CLS; every other format: CAUSAL_LM)")
    rows, _, info = build_datasets(data_cfg, loaded.tokenizer, task, label_names=label_names, classes_of=classes_of)
    prompts = []
    if task == "CAUSAL_LM" and splits.format != "text" and not args.no_generate:
        prompts = generation_prompts(splits.train, loaded.tokenizer, data_cfg.template)
    scorer = Scorer(loaded.model, loaded.tokenizer, rows, make_collator(data_cfg, loaded.tokenizer), prompts,
                    task, args)
    variants = {"base": loaded.model.disable_adapter() if loaded.adapter_dir else contextlib.nullcontext()}
    if loaded.adapter_dir:
        variants["adapter"] = contextlib.nullcontext()
    results, answers = {}, {}
    for name, switch in variants.items():
        with switch:
            results[name], answers[name] = scorer.score()
    print(f"{loaded.model_name}{' + ' + loaded.adapter_dir if loaded.adapter_dir else ''} on {args.data} "
          f"({info.format}): {len(rows)} examples scored, {len(prompts)} answers generated")
    print(format_table(results))
    if args.output:
        write_results(args, loaded, info.format, results, answers, prompts, len(rows))
        print(f"results written to {args.output}")
    return 0


def classes_for_data(args: argparse.Namespace, splits) -> tuple[list[str], str]:
    """(the classifier's class names in the order of its outputs, what they come from). The data's labels are
    mapped to them by name; labels the classifier does not know are refused, naming where they are."""
    from lorakit.label_names import LABELS_NAME

    names, head_size, source = classifier_classes(args)
    records, origins = splits.train, splits.train_origins  # every evaluation record is in "train"
    if names is None and head_size is None:  # no trained head (a base model): the data's own classes
        return splits.label_names, "the evaluation data"
    if names is None:  # an adapter from an older lorakit or from PEFT: no labels.json
        data_classes = sorted({str(r.label) for r in records})
        if all(isinstance(r.label, int) for r in records):
            names = [str(i) for i in range(head_size)]
        elif len(data_classes) == head_size:
            names = splits.label_names
            logger.warning("%s does not record its class names (no %s), so the labels %s are mapped to its %d "
                           "outputs in sorted order; check that this is the order it was trained with", source,
                           LABELS_NAME, data_classes, head_size)
        else:
            raise ValueError(
                f"{source} does not record its class names (no {LABELS_NAME}: trained by an older lorakit or by "
                f"PEFT), and the data has {len(data_classes)} classes ({', '.join(data_classes[:10])}) for its "
                f"{head_size} outputs, so which output is which class is unknown. Use integer class ids "
                f"(0 .. {head_size - 1}) in the data, or add {LABELS_NAME} to the adapter: "
                '{"label_names": [the class of output 0, of output 1, ...]}')
    unknown = [(origin, r.label) for r, origin in zip(records, origins) if str(r.label) not in names]
    if unknown:
        shown = "; ".join(f"{origin}: {label!r}" for origin, label in unknown[:3])
        raise ValueError(f"{len(unknown)} of {len(records)} records have a label that is not a class of {source} "
                         f"({shown}); its classes are {names}. A classifier only predicts the classes it was "
                         "trained with: evaluate on data labelled with those names.")
    return names, source


class Scorer:
    """Every metric of one model state (base, or with the adapter) on the same examples and prompts."""

    def __init__(self, model, tokenizer, rows, collate, prompts, task: str, args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.rows, self.collate = model, tokenizer, rows, collate
        self.prompts, self.task, self.args = prompts, task, args

    def batches(self):
        size = self.args.batch_size
        return (self.collate(self.rows[i:i + size]) for i in range(0, len(self.rows), size))

    def score(self) -> tuple[dict, list[str]]:
        from lorakit.eval import evaluate_loss, exact_match, generate_batch, rouge_scores

        if self.task == "SEQ_CLS":
            metrics = classification_metrics(self.model, self.batches())
        else:
            metrics = evaluate_loss(self.model, self.batches())
            metrics.pop("tokens", None)
        if not self.prompts:
            return metrics, []
        answers = generate_batch(self.model, self.tokenizer, [p.prompt_ids for p in self.prompts],
                                 max_new_tokens=self.args.max_new_tokens, batch_size=self.args.batch_size)
        references = [p.reference for p in self.prompts]
        metrics.update(rouge_scores(answers, references))
        metrics["exact_match"] = exact_match(answers, references)
        return metrics, answers


def classification_metrics(model, batches) -> dict:
    """Accuracy and mean cross-entropy over examples; batches hold input_ids, attention_mask, labels (B,)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
    if count == 0:
        raise ValueError("no examples to score")
    return {"accuracy": correct / count, "loss": loss_sum / count}


def format_table(results: dict[str, dict]) -> str:
    """A text table: one row per metric, one column per model state (+ the change when there are two)."""
    columns = list(results)
    header = ["metric", *columns] + (["change"] if len(columns) == 2 else [])
    lines = []
    for key, label in ROWS:
        values = [results[c].get(key) for c in columns]
        if all(v is None for v in values):
            continue
        digits = 2 if key == "perplexity" else 4
        cells = [label] + ["-" if v is None else f"{v:.{digits}f}" for v in values]
        if len(values) == 2:
            cells.append("-" if None in values else f"{values[1] - values[0]:+.{digits}f}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)  # noqa: E731
                                   for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def write_results(args, loaded, data_format: str, results: dict, answers: dict, prompts, num_examples: int) -> None:
    from lorakit.config import write_json_atomic

    samples = [{"index": p.index, "reference": p.reference, **{name: answers[name][i] for name in answers}}
               for i, p in enumerate(prompts)]
    write_json_atomic(args.output, {
        "model": loaded.model_name, "adapter": loaded.adapter_dir, "data": args.data, "format": data_format,
        "num_examples": num_examples, "num_generated": len(prompts), "max_new_tokens": args.max_new_tokens,
        "metrics": results, "samples": samples,
    })
