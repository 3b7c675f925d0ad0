"""Data pipeline: tokenisation, loss masks, truncation/dropping, text_label ids, generation prompts.

The tiny tokenizer is byte-level (one token per character, special tokens one token each), so expected
label positions can be read straight off the rendered text.
"""

from __future__ import annotations

import json

import pytest

from lorakit.train.data import DataConfig, build_datasets, generation_prompts, load_splits
from lorakit.train.templates import IGNORE_INDEX, encode
from tests.tiny import tiny_tokenizer

IM_END = 4  # <|im_end|>, the tiny tokenizer's EOS


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained_runs(tokenizer, example) -> list[str]:
    """Decoded text of each maximal run of trained (label != -100) tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token  # a trained label is the token itself (the model shifts)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def conversation(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def test_single_turn_exact_label_positions(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "m.jsonl", [conversation("hi", "yo")])
    [example], _, info = build_datasets(DataConfig(path=path), tok, "CAUSAL_LM")
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert example["input_ids"] == encode(tok, text) and len(example["input_ids"]) == 25
    # 0 <|im_start|>, 1-4 user, 5 \n, 6-7 hi, 8 <|im_end|>, 9 \n, 10 <|im_start|>, 11-19 assistant, 20 \n,
    # 21-22 yo, 23 <|im_end|>, 24 \n
    trained = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert trained == [21, 22, 23, 24]
    assert example["labels"][23] == IM_END  # the model learns to stop
    assert info.template == "tokenizer" and info.format == "messages"


def test_multi_turn_masks_everything_but_assistant_turns(tmp_path):
    tok = tiny_tokenizer()
    row = conversation("a", "bb", "c", "dd", system="S")
    [example], _, _ = build_datasets(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", [row])), tok)
    assert trained_runs(tok, example) == ["bb<|im_end|>\n", "dd<|im_end|>\n"]
    # The ids are exactly the tokenisation of the whole rendered conversation.
    assert example["input_ids"] == encode(tok, tok.apply_chat_template(row["messages"], tokenize=False))


def test_train_on_inputs_trains_everything_but_the_first_token(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "m.jsonl", [conversation("a", "b", "c", "d")])
    [example], _, _ = build_datasets(DataConfig(path=path, train_on_inputs=True), tok)
    assert example["labels"][0] == IGNORE_INDEX
    assert example["labels"][1:] == example["input_ids"][1:]


def test_fallback_template_masks_and_ends_with_eos(tmp_path):
    tok = tiny_tokenizer(chat_template=False)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1+1", "output": "2"}])
    [example], _, info = build_datasets(DataConfig(path=path), tok)
    assert info.template == "alpaca"
    assert tok.decode(example["input_ids"]) == "### Instruction:\nAdd\n1+1\n\n### Response:\n2<|im_end|>\n\n"
    assert trained_runs(tok, example) == ["2<|im_end|>\n\n"]
    # template="alpaca" forces the fallback even when the tokenizer has a chat template.
    [forced], _, _ = build_datasets(DataConfig(path=path, template="alpaca"), tiny_tokenizer())
    assert forced["input_ids"] == example["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        build_datasets(DataConfig(path=path, template="tokenizer"), tok)


def test_template_without_end_of_turn_gets_eos_appended(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    [example], _, _ = build_datasets(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", [conversation("q", "a")])), tok)
    assert example["input_ids"][-1] == IM_END and example["labels"][-1] == IM_END
    assert trained_runs(tok, example) == ["a\n<|im_end|>"]


def test_template_rendering_history_differently_never_trains_prompt_tokens(tmp_path):
    """A Qwen3-like template that marks only the LAST assistant turn: prefix renders differ from the full one.

    The common-prefix rule must not label user or template tokens; it may skip the earlier answer.
    """
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>{% endif %}"
    )
    row = conversation("q1", "A1", "q2", "A2")
    [example], _, info = build_datasets(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", [row])), tok)
    assert tok.decode(example["input_ids"]).count("<think></think>") == 1  # only before the last answer
    assert trained_runs(tok, example) == ["A2<|im_end|>\n"]  # A1 is skipped, and reported
    assert info.skipped_turns == 1


def test_completion_and_text_formats(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    [example], _, _ = build_datasets(DataConfig(path=path), tok)
    assert tok.decode(example["input_ids"]) == "2+2=4<|im_end|>"
    assert trained_runs(tok, example) == ["4<|im_end|>"]
    [text], _, _ = build_datasets(DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])), tok)
    assert tok.decode(text["input_ids"]) == "abc<|im_end|>"
    assert text["labels"] == [IGNORE_INDEX] + text["input_ids"][1:]


def test_cutoff_truncates_and_drops_fully_masked_examples(tmp_path):
    tok = tiny_tokenizer()
    rows = [conversation("x" * 40, "answer"), conversation("q", "a long answer")]
    train, _, info = build_datasets(DataConfig(path=write_jsonl(tmp_path / "m.jsonl", rows), cutoff_len=30), tok)
    # Row 0: the prompt alone is > 30 tokens -> no label left -> dropped. Row 1 is cut inside the answer.
    assert info.dropped_train == 1 and info.truncated_train == 2 and info.num_train == 1
    [kept] = train
    assert len(kept["input_ids"]) == len(kept["labels"]) == 30
    assert trained_runs(tok, kept) == ["a long ans"]  # prompt is 20 tokens, 10 left


def test_every_label_masked_is_a_clear_error(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "m.jsonl", [conversation("x" * 40, "answer")])
    with pytest.raises(ValueError, match=r"every label is masked.*cutoff_len=16.*shortest prompt has 59 tokens"):
        build_datasets(DataConfig(path=path, cutoff_len=16), tok)
    no_answer = {"messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(ValueError, match="every label is masked"):
        build_datasets(DataConfig(path=write_jsonl(tmp_path / "n.jsonl", [no_answer])), tok)


def test_text_label_ids_and_validation_labels(tmp_path):
    tok = tiny_tokenizer()
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
                                                {"text": "meh", "label": "neutral"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "fine", "label": "pos"}])
    examples, val_examples, info = build_datasets(DataConfig(path=train, val_path=val), tok, "SEQ_CLS")
    assert info.label_names == ("neg", "neutral", "pos") and info.template is None
    assert [ex["labels"] for ex in examples] == [2, 0, 1] and val_examples[0]["labels"] == 2
    assert tok.decode(examples[0]["input_ids"]) == "good"
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "x", "label": "angry"}])
    with pytest.raises(ValueError, match="label 'angry' is not one of the classes of the training data"):
        build_datasets(DataConfig(path=train, val_path=unknown), tok, "SEQ_CLS")


def test_task_type_must_fit_the_format(tmp_path):
    tok = tiny_tokenizer()
    labelled = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(ValueError, match="SEQ_CLS trains on text_label"):
        build_datasets(DataConfig(path=labelled), tok, "CAUSAL_LM")
    with pytest.raises(ValueError, match="packing"):
        build_datasets(DataConfig(path=labelled, packing=True), tok, "SEQ_CLS")
    with pytest.raises(ValueError, match="task_type"):
        build_datasets(DataConfig(path=labelled), tok, "TOKEN_CLS")


def test_generation_prompts_match_training_prompts(tmp_path):
    tok = tiny_tokenizer()
    rows = [conversation("a", "bb", "c", "dd", system="S"), conversation("q", "ans")]
    cfg = DataConfig(path=write_jsonl(tmp_path / "m.jsonl", rows))
    train, _, _ = build_datasets(cfg, tok)
    prompts = generation_prompts(load_splits(cfg).train, tok, cfg.template)
    assert [p.reference for p in prompts] == ["dd", "ans"] and [p.index for p in prompts] == [0, 1]
    generation_prompt = encode(tok, "<|im_start|>assistant\n")
    for prompt, example in zip(prompts, train):
        assert prompt.prompt_ids[-len(generation_prompt):] == generation_prompt
        last_answer_start = max(i for i, label in enumerate(example["labels"])
                                if label != IGNORE_INDEX and example["labels"][i - 1] == IGNORE_INDEX)
        assert prompt.prompt_ids == example["input_ids"][:last_answer_start]  # same tokens as in training
    assert "bb<|im_end|>" in tok.decode(prompts[0].prompt_ids)  # earlier turns are part of the prompt


def test_generation_prompts_for_raw_completion_and_text_error(tmp_path):
    tok = tiny_tokenizer()
    splits = load_splits(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])))
    [prompt] = generation_prompts(splits.train, tok)
    assert tok.decode(prompt.prompt_ids) == "2+2=" and prompt.reference == "4"
    text = load_splits(DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])))
    with pytest.raises(ValueError, match="generation prompts need prompt/answer data"):
        generation_prompts(text.train, tok)
