"""The class names of a sequence-classification (SEQ_CLS) adapter, saved beside it as labels.json.

An adapter's files do not say which output of the classification head is which class, so training writes
`labels.json` next to `adapter_config.json` (PEFT ignores files it does not know, so the directory still loads
there):

    {"label_names": ["negative", "neutral", "positive"]}      # the head's outputs 0, 1, 2

Evaluation maps the data's labels to the head's outputs by these names, never by the order in which the
evaluation data happens to sort. A full model (finetuning_type full/freeze) keeps them in config.json's id2label.
"""

from __future__ import annotations

import json
import os
import re

from lorakit.config import write_json_atomic

LABELS_NAME = "labels.json"
_DEFAULT_NAME = re.compile(r"^LABEL_\d+$")  # what transformers invents when nobody named the classes


def write_label_names(directory: str, label_names) -> None:
    write_json_atomic(os.path.join(directory, LABELS_NAME), {"label_names": [str(n) for n in label_names]})


def read_label_names(directory: str) -> list[str] | None:
    """The class names saved with an adapter, or None when it has no labels.json (an older lorakit, or PEFT)."""
    path = os.path.join(directory, LABELS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            names = json.load(fh).get("label_names")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid labels file ({err}); it should hold "
                         '{"label_names": ["first class", "second class", ...]}') from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise ValueError(f"{path}: label_names must be a list of distinct class names, got {names!r}")
    return names


def config_label_names(config) -> list[str] | None:
    """The class names in a transformers config (id2label), or None when they are transformers' defaults."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)] if id2label else []
    if not names or all(_DEFAULT_NAME.match(n) for n in names):
        return None
    return names
