"""`lorakit chat` driven through stdin: streaming answers, conversation history, /reset, /exit, EOF, Ctrl-C."""

from __future__ import annotations

import builtins
import io

import pytest
from transformers import AutoTokenizer

import lorakit.eval
from tests.integration.cli_support import make_adapter, make_model_dir, run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_chat")
    model_dir = make_model_dir(root / "model")
    return model_dir, make_adapter(model_dir, root / "adapter")


@pytest.fixture
def recorded_prompts(monkeypatch):
    """The prompt ids of every stream_generate call (the real one still runs)."""
    real, prompts = lorakit.eval.stream_generate, []

    def recording(model, tokenizer, prompt_ids, **kwargs):
        prompts.append(list(prompt_ids))
        return real(model, tokenizer, prompt_ids, **kwargs)

    monkeypatch.setattr(lorakit.eval, "stream_generate", recording)
    return prompts


def chat(capsys, monkeypatch, setup, stdin: str, *extra):
    model_dir, adapter = setup
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return run_cli(capsys, "chat", "--model", model_dir, "--adapter", adapter, "--max-new-tokens", 4, *extra)


def test_chat_keeps_history_and_resets(capsys, monkeypatch, setup, recorded_prompts):
    code, stdout, stderr = chat(capsys, monkeypatch, setup, "first question\nsecond question\n/reset\n"
                                "third question\n/exit\nnever read\n", "--system", "Be kind.")
    assert code == 0, stderr
    assert len(recorded_prompts) == 3
    tokenizer = AutoTokenizer.from_pretrained(setup[0])
    first, second, third = (tokenizer.decode(ids) for ids in recorded_prompts)
    answer = stdout.split("assistant> ")[1].split("\n")[0].strip()  # the first streamed answer
    system = {"role": "system", "content": "Be kind."}
    assert second == tokenizer.apply_chat_template(
        [system, {"role": "user", "content": "first question"}, {"role": "assistant", "content": answer},
         {"role": "user", "content": "second question"}], add_generation_prompt=True, tokenize=False)
    assert first.startswith("<|im_start|>system\nBe kind.") and "first question" in first
    assert "third question" in third and "first question" not in third and "Be kind." in third
    assert stdout.count("assistant> ") == 3 and "(conversation cleared)" in stdout


def test_chat_ends_cleanly_at_end_of_input(capsys, monkeypatch, setup, recorded_prompts):
    code, stdout, stderr = chat(capsys, monkeypatch, setup, "hello\n\n/unknown\n")
    assert code == 0 and stderr == ""
    assert len(recorded_prompts) == 1  # the blank line and the unknown command generate nothing
    assert "unknown command '/unknown'" in stdout


def test_ctrl_c_at_the_prompt_leaves(capsys, monkeypatch, setup):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupted)
    code, _, stderr = chat(capsys, monkeypatch, setup, "")
    assert code == 0 and "Traceback" not in stderr


def test_ctrl_c_while_streaming_drops_that_exchange(capsys, monkeypatch, setup):
    real, prompts = lorakit.eval.stream_generate, []

    def interrupted_first_answer(model, tokenizer, prompt_ids, **kwargs):
        prompts.append(tokenizer.decode(prompt_ids))
        pieces = real(model, tokenizer, prompt_ids, **kwargs)
        if len(prompts) > 1:
            return pieces

        def one_piece_then_ctrl_c():
            try:
                yield next(pieces, "")
                raise KeyboardInterrupt
            finally:
                pieces.close()

        return one_piece_then_ctrl_c()

    monkeypatch.setattr(lorakit.eval, "stream_generate", interrupted_first_answer)
    code, stdout, _ = chat(capsys, monkeypatch, setup, "dropped question\nkept question\n")
    assert code == 0
    assert "(stopped; this exchange is not kept)" in stdout
    assert len(prompts) == 2 and "dropped question" not in prompts[1] and "kept question" in prompts[1]


def test_oldest_exchanges_leave_when_the_context_is_full():
    from types import SimpleNamespace

    from lorakit.cli.chat import ChatSession
    from lorakit.cli.common import prompt_encoder
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    encoder = prompt_encoder(tokenizer)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=150))
    session = ChatSession(model, tokenizer, encoder, "sys", {"max_new_tokens": 20})
    session.turns = [{"role": "user", "content": "a" * 30}, {"role": "assistant", "content": "b" * 30},
                     {"role": "user", "content": "c" * 10}, {"role": "assistant", "content": "d" * 10}]
    text = tokenizer.decode(session.prompt_ids("e" * 10))
    assert "a" * 30 not in text and "b" * 30 not in text  # the oldest exchange no longer fits
    assert "c" * 10 in text and "d" * 10 in text and text.startswith("<|im_start|>system\nsys")
    assert session.prompt_ids("x" * 200) is None  # the new message alone is too long
