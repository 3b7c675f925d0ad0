"""`lorakit generate`: prompts rendered with the tokenizer's chat template as a user turn, batched."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import PeftModel
from lorakit.eval import generate_batch
from tests.integration.cli_support import make_adapter, make_model_dir, run_cli

PROMPTS = ["hello there", "what is 2+2?", "name a colour"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_generate")
    model_dir = make_model_dir(root / "model")
    return root, model_dir, make_adapter(model_dir, root / "adapter")


def expected_answers(model_dir, adapter, messages_per_prompt, max_new_tokens, batch_size=8):
    """What generate must print: the tokenizer's own chat template, then greedy decoding with the adapter
    (in the same batches, so padding is the same)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    prompt_ids = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"] for messages in messages_per_prompt]
    return generate_batch(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)


def test_generate_with_adapter_and_system_message(setup, capsys):
    root, model_dir, adapter = setup
    out = root / "answers.jsonl"
    code, stdout, stderr = run_cli(capsys, "generate", "--model", model_dir, "--adapter", adapter,
                                   "--prompt", *PROMPTS, "--system", "Be brief.", "--max-new-tokens", 5,
                                   "--batch-size", 2, "--output", out)
    assert code == 0, stderr
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["prompt"] for w in written] == PROMPTS and all(w["response"] for w in written)
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in PROMPTS]
    assert [w["response"] for w in written] == expected_answers(model_dir, adapter, messages, 5, batch_size=2)
    for number, prompt in enumerate(PROMPTS, start=1):
        assert f"[{number}] {prompt}\n" in stdout


def test_generate_from_prompts_files_without_adapter(setup, capsys, tmp_path):
    _, model_dir, _ = setup
    txt = tmp_path / "prompts.txt"
    txt.write_text("hello there\n\nname a colour\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('"hello there"\n{"prompt": "name a colour"}\n', encoding="utf-8")
    messages = [[{"role": "user", "content": p}] for p in ("hello there", "name a colour")]
    expected = expected_answers(model_dir, None, messages, 4)
    for path in (txt, jsonl):
        out = tmp_path / f"{path.suffix[1:]}.out.jsonl"
        code, _, stderr = run_cli(capsys, "generate", "--model", model_dir, "--prompts-file", path,
                                  "--max-new-tokens", 4, "--output", out)
        assert code == 0, stderr
        assert [json.loads(line)["response"] for line in out.read_text().splitlines()] == expected


def test_single_prompt_prints_only_the_answer(setup, capsys):
    _, model_dir, adapter = setup
    code, stdout, _ = run_cli(capsys, "generate", "--adapter", adapter, "--prompt", "hello there",
                              "--max-new-tokens", 4)
    assert code == 0
    expected = expected_answers(model_dir, adapter, [[{"role": "user", "content": "hello there"}]], 4)
    assert stdout == expected[0] + "\n"


def test_raw_prompt_skips_the_chat_template(setup, capsys):
    _, model_dir, _ = setup
    code, stdout, _ = run_cli(capsys, "generate", "--model", model_dir, "--raw", "--prompt", "Once upon a time",
                              "--max-new-tokens", 4)
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # adds no BOS by itself, so none is added
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert stdout == generate_batch(model, tokenizer, [ids], max_new_tokens=4)[0] + "\n"


def test_generate_bad_inputs(setup, capsys, tmp_path):
    _, model_dir, adapter = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    cases = [
        (["--model", model_dir, "--prompts-file", tmp_path / "none.txt"], "not found"),
        (["--model", model_dir, "--prompts-file", empty], "holds no prompts"),
        (["--model", model_dir, "--prompt", "x", "--do-sample", "--temperature", 0], "temperature"),
        (["--model", model_dir, "--prompt", "x", "--raw", "--system", "s"], "--system needs the chat template"),
        (["--prompt", "x"], "--model is required"),
        (["--model", model_dir, "--prompt", "x", "--output", tmp_path / "no" / "out.jsonl"], "does not exist"),
    ]
    for args, expected in cases:
        code, _, stderr = run_cli(capsys, "generate", *args)
        assert code == 1, args
        assert stderr.startswith("lorakit: error: ") and expected in stderr, stderr
    code, _, stderr = run_cli(capsys, "generate", "--model", model_dir)  # neither --prompt nor --prompts-file
    assert code == 2 and "one of the arguments --prompt --prompts-file is required" in stderr
