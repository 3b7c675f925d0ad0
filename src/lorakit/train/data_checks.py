"""Suspect data: records that train without an error but probably not as the user meant. Each finding is a
warning, counted, with up to three examples located by line (or record) number:

- empty answers (a blank CSV cell, "completion": ""): the model learns to answer with nothing;
- answers cut by cutoff_len: the model never sees their end, nor the end-of-sequence token, so it does not
  learn to stop;
- validation records that also occur in the training data: validation scores are optimistic;
- classification labels: classes the validation data lacks (or has on its own: that one is an error, raised
  while tokenising), a training set with a single class, and integer class ids with gaps (`0, 1, 2, 7`: a
  stray id silently makes an 8-class head whose classes 3-6 never occur).

    findings = suspect_data(splits, cutoff_len, cut_train, cut_val)   # cut_*: origins of examples cut
    for finding in findings: print(finding.message)
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.train.data_formats import Chat, Completion, Labelled, Text

EXAMPLES_SHOWN = 3


@dataclass(frozen=True)
class Finding:
    kind: str  # empty_answers, cut_by_cutoff_len, duplicates, label_sets_differ, single_class, class_id_gaps
    count: int  # records concerned
    message: str  # one line: what, how many, examples, what to do

    def __str__(self) -> str:
        return self.message


def suspect_data(splits, cutoff_len: int, cut_train: list, cut_val: list) -> list[Finding]:
    """Every finding on the training and validation splits (see the module docstring)."""
    findings = []
    for name, records, origins, cut in (("training", splits.train, splits.train_origins, cut_train),
                                        ("validation", splits.val, splits.val_origins, cut_val)):
        findings += _empty_answers(name, records, origins)
        findings += _cut_examples(name, records, cut, cutoff_len)
    findings += _duplicates(splits)
    if splits.format == "text_label":
        findings += _label_findings(splits)
    return findings


def _examples(origins) -> str:
    """"train.jsonl: line 4, line 9, line 17, ..." (the file once when they share it)."""
    shown, more = origins[:EXAMPLES_SHOWN], ", ..." if len(origins) > EXAMPLES_SHOWN else ""
    if len({o.path for o in shown}) == 1:
        return f"{shown[0].path}: {', '.join(o.short() for o in shown)}{more}"
    return "; ".join(str(o) for o in shown) + more


def _empty_answers(split: str, records: list, origins: list) -> list[Finding]:
    empty = [origins[i] for i, record in enumerate(records) if _is_empty(record)]
    if not empty:
        return []
    what = "texts" if isinstance(records[0], (Text, Labelled)) else "answers"
    return [Finding("empty_answers", len(empty), (
        f"{len(empty)} of {len(records)} {split} {what} are empty ({_examples(empty)}): the model learns to "
        f"{'answer with nothing' if what == 'answers' else 'expect empty input'}. Fill them in or remove those "
        "records."))]


def _is_empty(record) -> bool:
    if isinstance(record, Chat):
        return any(trained and not message["content"].strip()
                   for message, trained in zip(record.messages, record.trained))
    if isinstance(record, Completion):
        return not record.completion.strip()
    return not record.text.strip()


def _cut_examples(split: str, records: list, cut: list, cutoff_len: int) -> list[Finding]:
    if not cut:
        return []
    if isinstance(records[0], Labelled):
        effect = "the classifier only sees their beginning"
    elif isinstance(records[0], Text):
        effect = "their end is never trained on"
    else:
        effect = "their answers lose the end and the end-of-sequence token, so the model does not learn to stop"
    every = f"all {len(cut)}" if len(cut) == len(records) > 1 else f"{len(cut)} of {len(records)}"
    return [Finding("cut_by_cutoff_len", len(cut), (
        f"{every} {split} examples {'is' if len(cut) == 1 else 'are'} longer than data.cutoff_len={cutoff_len} and "
        f"cut there ({_examples(cut)}): {effect}. Raise data.cutoff_len, or shorten those records."))]


def _duplicates(splits) -> list[Finding]:
    if not splits.val:
        return []
    first_in_train = {}
    for record, origin in zip(splits.train, splits.train_origins):
        first_in_train.setdefault(repr(record), origin)  # records hold dicts: compared by their repr
    pairs = [(origin, first_in_train[repr(record)]) for record, origin in zip(splits.val, splits.val_origins)
             if repr(record) in first_in_train]
    if not pairs:
        return []
    shown = "; ".join(f"{v.path} {v.short()} = {t.short()}" if v.path == t.path else f"{v} = {t}"
                      for v, t in pairs[:EXAMPLES_SHOWN]) + ("; ..." if len(pairs) > EXAMPLES_SHOWN else "")
    return [Finding("duplicates", len(pairs), (
        f"{len(pairs)} of {len(splits.val)} validation records also occur in the training data ({shown}): "
        "validation scores measure memory, not generalisation. Remove them from one of the two."))]


def _label_findings(splits) -> list[Finding]:
    findings = []
    train_labels = [str(r.label) for r in splits.train]
    present = set(train_labels)
    if len(present) == 1:
        findings.append(Finding("single_class", len(train_labels), (
            f"every one of the {len(train_labels)} training records has the label {train_labels[0]!r}: a classifier "
            "trained on one class learns nothing. Check data.label_field and the data.")))
    absent = [name for name in splits.label_names or [] if name not in present]
    if absent and all(isinstance(r.label, int) for r in splits.train):
        stray = [o for r, o in zip(splits.train, splits.train_origins) if r.label > int(absent[0])]
        findings.append(Finding("class_id_gaps", len(stray), (
            f"the integer class ids skip {', '.join(absent[:10])}{', ...' if len(absent) > 10 else ''}: labels above "
            f"them ({_examples(stray)}) give the classifier {len(splits.label_names)} outputs, "
            f"{len(absent)} of which no record has. A typo? Class ids must be 0 .. number of classes - 1.")))
    if splits.val:
        val_labels = {str(r.label) for r in splits.val}
        missing = sorted(present - val_labels)
        if missing:
            findings.append(Finding("label_sets_differ", len(missing), (
                f"classes in the training data but never in the validation data: {missing[:10]}; validation "
                "accuracy says nothing about them. Use a stratified or larger validation set.")))
    return findings
