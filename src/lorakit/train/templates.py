"""Chat rendering and tokenisation with loss masks.

Rendering. A conversation becomes text through the tokenizer's own chat template (`apply_chat_template`),
so training sees exactly what `generate` will see later. A tokenizer without a chat template (a base
model) gets the fallback, an Alpaca-style template:

    {bos}{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}{eos}\\n\\n ...

(`{bos}` only when the tokenizer adds a BOS token by itself; the generation prompt is "### Response:\\n").

Masking. Token ids always come from tokenising the *whole* rendered conversation once. Which of those
tokens are trained is found by rendering prefixes of the conversation with the same template and taking
token diffs: the response of assistant turn i spans

    [ lcp(ids(render(turns[:i], add_generation_prompt=True)), ids_full),
      lcp(ids(render(turns[:i+1])), ids_full) )

where lcp is the length of the common token prefix. When a template renders a prefix differently from
the full conversation (for example it drops earlier turns' reasoning), or a token straddles a turn
boundary, lcp stops at the first difference: such tokens are masked rather than trained on by mistake.

Labels are -100 on every masked token and on the first token of every example: a causal LM never
predicts its first token, and in a packed row this keeps the last token of one example from being
trained to predict the first token of the next.
"""

from __future__ import annotations

from lorakit.eval.metrics import IGNORE_INDEX
from lorakit.train.data_formats import Chat, Completion, Labelled, Text

FALLBACK_TEMPLATE = "alpaca"
TEMPLATES = ("auto", "tokenizer", FALLBACK_TEMPLATE)
_FALLBACK_HEADERS = {"user": "### Instruction:\n", "assistant": "### Response:\n", "tool": "### Tool:\n"}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text as rendered (special tokens in the text are kept, none are added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def wants_bos(tokenizer) -> bool:
    """True when the tokenizer puts a BOS token in front of plain text by itself (e.g. Llama, not GPT-2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ExampleEncoder:
    """Renders and tokenises records for one tokenizer: chat template or fallback, BOS/EOS handling."""

    def __init__(self, tokenizer, template: str = "auto", train_on_inputs: bool = False) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}; got {template!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if template == "tokenizer" and not has_template:
            raise ValueError(
                "template='tokenizer' but this tokenizer has no chat template (a base model?). Use "
                f"template='auto' or {FALLBACK_TEMPLATE!r} for the fallback Alpaca-style template."
            )
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs
        use_tokenizer = template == "tokenizer" or (template == "auto" and has_template)
        self.template = "tokenizer" if use_tokenizer else FALLBACK_TEMPLATE
        self.bos_ids = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []
        self.eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.bos_text = tokenizer.bos_token if self.bos_ids else ""
        self.eos_text = tokenizer.eos_token or ""
        # Assistant turns that got no loss because the template renders them differently inside a prefix.
        self.skipped_turns = 0

    # ---- rendering ------------------------------------------------------------------------------
    def render(self, messages, add_generation_prompt: bool = False) -> str:
        if self.template == "tokenizer":
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        parts = [self.bos_text]
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                parts.append(f"{content}\n\n")
            elif role == "assistant":
                parts.append(f"{_FALLBACK_HEADERS[role]}{content}{self.eos_text}\n\n")
            else:
                parts.append(f"{_FALLBACK_HEADERS[role]}{content}\n\n")
        if add_generation_prompt:
            parts.append(_FALLBACK_HEADERS["assistant"])
        return "".join(parts)

    def encode_rendered(self, messages, add_generation_prompt: bool, where: str) -> list[int]:
        try:
            text = self.render(messages, add_generation_prompt)
        except Exception as err:  # jinja TemplateError, or a template's own raise_exception
            raise ValueError(
                f"{where}: the chat template cannot render this conversation ({err}). Roles in order: "
                f"{[m['role'] for m in messages]}. Some templates reject system messages or need strictly "
                "alternating user/assistant turns."
            ) from err
        return encode(self.tokenizer, text)

    # ---- training examples ----------------------------------------------------------------------
    def chat(self, record: Chat, where: str) -> dict:
        """Tokens of the rendered conversation; labels on assistant turns (everything if train_on_inputs)."""
        ids = self.encode_rendered(record.messages, False, where)
        labels = list(ids) if self.train_on_inputs else [IGNORE_INDEX] * len(ids)
        last_span = None
        for i, trained in enumerate(record.trained):
            if not trained:
                continue
            start = common_prefix_len(self.encode_rendered(record.messages[:i], True, where), ids)
            if i + 1 == len(record.messages):
                end = len(ids)
            else:
                end = common_prefix_len(self.encode_rendered(record.messages[: i + 1], False, where), ids)
            labels[start:end] = ids[start:end]
            self.skipped_turns += int(start >= end)
            last_span = (start, end)
        # The model must learn to stop: make sure the final answer ends with EOS when the template lacks it.
        if last_span and record.trained[-1] and self.eos_ids and self.eos_ids[0] not in ids[last_span[0]:last_span[1]]:
            ids, labels = ids + self.eos_ids, labels + self.eos_ids
        return _finish(ids, labels)

    def completion(self, record: Completion) -> dict:
        """Raw prompt + completion + EOS (no chat template); loss on the completion and EOS."""
        ids = self.bos_ids + encode(self.tokenizer, record.prompt + record.completion)
        start = common_prefix_len(self.bos_ids + encode(self.tokenizer, record.prompt), ids)
        ids = ids + self.eos_ids
        labels = list(ids) if self.train_on_inputs else [IGNORE_INDEX] * start + ids[start:]
        return _finish(ids, labels)

    def text(self, record: Text) -> dict:
        """Plain text + EOS, loss on every token."""
        ids = self.bos_ids + encode(self.tokenizer, record.text) + self.eos_ids
        return _finish(ids, list(ids))

    def labelled(self, record: Labelled, label_id: int, cutoff_len: int) -> dict:
        """Classifier input with the tokenizer's own special tokens (e.g. [CLS] ... [SEP]); labels = class id."""
        ids = self.tokenizer(record.text, add_special_tokens=True, truncation=True, max_length=cutoff_len)["input_ids"]
        return {"input_ids": list(ids), "labels": label_id}

    def labelled_length(self, record: Labelled) -> int:
        """Tokens of a classifier input before truncation (to tell a cut text from one that just fits)."""
        return len(self.tokenizer(record.text, add_special_tokens=True)["input_ids"])

    # ---- generation prompts ---------------------------------------------------------------------
    def generation_prompt(self, record: Chat | Completion, where: str) -> tuple[list[int], str] | None:
        """(prompt ids exactly as in training, reference answer), or None when there is nothing to answer.

        Chat: the conversation before the LAST assistant turn plus the assistant generation prompt.
        Completion: BOS (when the tokenizer uses one) + the prompt.
        """
        if isinstance(record, Completion):
            return self.bos_ids + encode(self.tokenizer, record.prompt), record.completion
        last = max((i for i, m in enumerate(record.messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        return self.encode_rendered(record.messages[:last], True, where), record.messages[last]["content"]


def _finish(ids: list[int], labels: list[int]) -> dict:
    if labels:
        labels[0] = IGNORE_INDEX  # see module docstring: never trained, and safe at pack boundaries
    return {"input_ids": ids, "labels": labels}
