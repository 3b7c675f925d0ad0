"""Record formats: raw rows (dicts) -> normalised records the tokenizer step understands.

Four normalised record types cover every format:
  Chat        a conversation [{"role", "content"}, ...] and which turns get loss
              (alpaca, messages, sharegpt, and prompt_completion when its values are message lists)
  Completion  a raw prompt and its continuation, no chat template (prompt_completion with strings)
  Text        plain language-model text, loss on every token (text)
  Labelled    a text and its class label, for sequence classification (text_label)

Field names follow LLaMA-Factory (alpaca, sharegpt), OpenAI (messages) and TRL (prompt_completion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "text_label")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles (LLaMA-Factory's observation/function names are tool turns).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "observation": "tool", "tool": "tool"}


@dataclass(frozen=True)
class Chat:
    messages: tuple[dict, ...]  # ({"role": ..., "content": ...}, ...)
    trained: tuple[bool, ...]  # one flag per message: True for assistant turns that get loss


@dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Labelled:
    text: str
    label: int | str


Record = Chat | Completion | Text | Labelled


def required_fields(fmt: str, text_field: str = "text", label_field: str = "label") -> tuple[str, ...]:
    return {
        "alpaca": ("instruction", "output"),
        "messages": ("messages",),
        "sharegpt": ("conversations",),
        "prompt_completion": ("prompt", "completion"),
        "text": (text_field,),
        "text_label": (text_field, label_field),
    }[fmt]


def detect_format(row: dict, source: str, text_field: str = "text", label_field: str = "label") -> str:
    """Guess the format from the keys of one row (the first); fail listing what each format needs."""
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] else "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if text_field in row and label_field in row:
        return "text_label"
    if text_field in row:
        return "text"
    needs = "; ".join(f"{fmt}: {', '.join(required_fields(fmt, text_field, label_field))}" for fmt in FORMATS[1:])
    raise ValueError(
        f"Cannot detect the data format of {source}: the first record has columns {sorted(row)}. "
        f"Formats and the fields they need: {needs}. Rename the columns, or set format= (and "
        "text_field=/label_field= for text data)."
    )


def normalise_rows(rows: list[dict], fmt: str, source: str, text_field: str = "text", label_field: str = "label",
                   system_prompt: str | None = None, origins: list | None = None) -> list[Record]:
    """Turn every raw row into a Record of `fmt` (not "auto": detect first). `origins[i]` says where row i comes
    from in error messages (e.g. "data.jsonl, line 12 (record 11)"); default "<source>, record <i>"."""
    reader = _Reader(source, fmt, text_field, label_field)
    records = [reader.record(row, index, origins[index] if origins else None) for index, row in enumerate(rows)]
    if system_prompt is not None:
        records = [_with_system_prompt(record, system_prompt, fmt) for record in records]
    return records


def _with_system_prompt(record: Record, system_prompt: str, fmt: str) -> Record:
    if not isinstance(record, Chat):
        raise ValueError(
            f"system_prompt is set but the {fmt!r} records are not conversations; a system prompt only applies "
            "to alpaca, messages, sharegpt and conversational prompt_completion data. Remove system_prompt."
        )
    if record.messages and record.messages[0]["role"] == "system":
        return record  # the record's own system message wins
    system = {"role": "system", "content": system_prompt}
    return Chat(messages=(system, *record.messages), trained=(False, *record.trained))


class _Reader:
    """Per-format row readers; every error names the record index, the field and the columns found."""

    def __init__(self, source: str, fmt: str, text_field: str, label_field: str) -> None:
        self.source, self.fmt, self.text_field, self.label_field = source, fmt, text_field, label_field

    def record(self, row: dict, index: int, origin=None) -> Record:
        self.row, self.index, self.origin = row, index, origin
        return getattr(self, f"_{self.fmt}")()

    # ---- errors ---------------------------------------------------------------------------------
    def fail(self, problem: str) -> ValueError:
        needs = ", ".join(required_fields(self.fmt, self.text_field, self.label_field))
        where = self.origin or f"{self.source}, record {self.index}"
        return ValueError(f"{where}: {problem} (format {self.fmt!r} needs: {needs}; columns found: {sorted(self.row)})")

    def string(self, field: str, optional: bool = False) -> str:
        value = self.row.get(field)
        if value is None:
            if optional:
                return ""
            raise self.fail(self.absent(field))
        if not isinstance(value, str):
            raise self.fail(f"field {field!r} must be a string, got {type(value).__name__}")
        return value

    def turn_list(self, preferred: str, other: str) -> list:
        key = preferred if preferred in self.row or other not in self.row else other
        turns = self.row.get(key)
        if turns is None:
            raise self.fail(self.absent(key if key in self.row else preferred))
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise self.fail(f"field {key!r} must be a list of objects, got {type(turns).__name__}")
        return turns

    # ---- formats --------------------------------------------------------------------------------
    def _alpaca(self) -> Chat:
        instruction, extra = self.string("instruction"), self.string("input", optional=True)
        output, system = self.string("output"), self.string("system", optional=True)
        messages = [{"role": "system", "content": system}] if system else []
        for pair in self.row.get("history") or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise self.fail("field 'history' must be a list of [question, answer] string pairs")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = f"{instruction}\n{extra}" if extra else instruction  # LLaMA-Factory joins them with "\n"
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return self.chat(messages, weights=[1] * len(messages))

    def _messages(self, turns: list | None = None) -> Chat:
        messages, weights = [], []
        for turn in turns if turns is not None else self.turn_list("messages", "conversations"):
            if not isinstance(turn, dict):
                raise self.fail(f"every message must be an object with 'role' and 'content', got {turn!r:.60}")
            role = turn.get("role")
            if role not in CHAT_ROLES:
                raise self.fail(f"message role {role!r} is not one of {CHAT_ROLES}")
            messages.append({"role": role, "content": self.content(turn.get("content"))})
            weights.append(turn.get("weight", 1))  # OpenAI fine-tuning: weight 0 skips an assistant turn
        return self.chat(messages, weights)

    def _sharegpt(self) -> Chat:
        system = self.string("system", optional=True)  # LLaMA-Factory keeps the system prompt in its own column
        messages = [{"role": "system", "content": system}] if system else []
        for turn in self.turn_list("conversations", "messages"):
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise self.fail(f"speaker 'from': {speaker!r} is not one of {sorted(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": self.content(turn.get("value"))})
        return self.chat(messages, weights=[1] * len(messages))

    def _prompt_completion(self) -> Chat | Completion:
        prompt, completion = self.row.get("prompt"), self.row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise self.fail("'prompt' and 'completion' must both be strings or both be message lists")
            return self._messages(turns=prompt + completion)
        return Completion(prompt=self.string("prompt"), completion=self.string("completion"))

    def _text(self) -> Text:
        return Text(text=self.string(self.text_field))

    def _text_label(self) -> Labelled:
        text, label = self.string(self.text_field), self.row.get(self.label_field)
        if label is None:
            raise self.fail(self.absent(self.label_field))
        if label == "":
            raise self.fail(f"field {self.label_field!r} is empty; every record needs a class label")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise self.fail(f"label {label!r} must be an integer class id or a string class name")
        if isinstance(label, str) and re.fullmatch(r"-?\d+", label.strip()):
            label = int(label)  # CSV cells are strings: "2" is the class id 2
        if isinstance(label, int) and label < 0:
            raise self.fail(f"label {label} is negative; class ids start at 0")
        return Labelled(text=text, label=label)

    # ---- helpers --------------------------------------------------------------------------------
    def absent(self, field: str) -> str:
        """A field that is not there, and one that is there with the value null, are different mistakes."""
        if field in self.row:
            return f"field {field!r} is null; give it a value (an empty answer is \"\", which trains the model to answer nothing)"
        return f"missing required field {field!r}"

    def content(self, value) -> str:
        """A message's text; OpenAI multi-part content [{"type": "text", "text": ...}] is joined."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
            return "".join(part["text"] for part in value)
        raise self.fail(f"message content must be a string, got {type(value).__name__}: {str(value)[:60]}")

    def chat(self, messages: list[dict], weights: list) -> Chat:
        if not messages:
            raise self.fail("the conversation is empty")
        first_turn = next((m["role"] for m in messages if m["role"] != "system"), None)
        if first_turn == "assistant":
            raise self.fail("the conversation starts with an assistant turn; it needs a user turn before it")
        trained = tuple(m["role"] == "assistant" and bool(w) for m, w in zip(messages, weights))
        return Chat(messages=tuple(messages), trained=trained)


def label_names_for(records: list[Labelled]) -> list[str]:
    """Class names in id order. String labels: sorted unique names. Integer labels: "0" .. str(max)."""
    labels = {r.label for r in records}
    kinds = {type(label) for label in labels}
    if kinds == {int}:
        return [str(i) for i in range(max(labels) + 1)]
    if kinds == {str}:
        return sorted(labels)
    raise ValueError(
        f"Labels mix integers and strings ({sorted(map(str, labels))[:10]}); use one kind: all class ids or all "
        "class names."
    )


def label_id(label: int | str, label_names: list[str], where: str, classes_of: str = "the training data") -> int:
    """The class id of one label, by name, given the names fixed by the training data (or by the model)."""
    if str(label) not in label_names:  # integer names are "0", "1", ... so str() covers both kinds
        raise ValueError(f"{where}: label {label!r} is not one of the classes of {classes_of} ({label_names}); "
                         "a classifier only predicts the classes it was trained with")
    return label_names.index(str(label))
