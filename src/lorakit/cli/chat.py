"""Talk with a model (and an adapter) interactively; answers appear as they are generated.

    lorakit chat --model smollm2
    lorakit chat --adapter runs/my-run/adapter --system "You answer in one sentence."

Every answer sees the whole conversation so far, rendered with the chat template as in training; when
it no longer fits the model's context, the oldest exchanges are left out. Type /reset to forget the
conversation and /exit to leave. Ctrl-C while an answer is streaming stops that answer; Ctrl-C or
Ctrl-D (end of input) at the prompt leaves.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.cli.common import (
    add_generation_arguments, add_model_arguments, chat_prompt_ids, generation_kwargs, load_model, prompt_encoder,
)

USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    add_generation_arguments(parser, max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    options = generation_kwargs(args)
    loaded = load_model(args, "CAUSAL_LM", why="chat (a causal language model)")
    session = ChatSession(loaded.model, loaded.tokenizer, prompt_encoder(loaded.tokenizer, args.template),
                          args.system, options)
    adapter = f" + {loaded.adapter_dir}" if loaded.adapter_dir else ""
    print(f"chatting with {loaded.model_name}{adapter}. {RESET_COMMAND} forgets the conversation, "
          f"{EXIT_COMMANDS[0]} leaves.", flush=True)
    while True:
        try:
            text = input(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return 0
        if text == RESET_COMMAND:
            session.reset()
            print("(conversation cleared)")
        elif text.startswith("/"):
            print(f"(unknown command {text!r}; commands: {RESET_COMMAND}, {', '.join(EXIT_COMMANDS)})")
        else:
            session.reply(text, sys.stdout)


class ChatSession:
    """The conversation (a list of chat messages) and how to extend it by one streamed answer."""

    def __init__(self, model, tokenizer, encoder, system: str | None, options: dict) -> None:
        self.model, self.tokenizer, self.encoder, self.options = model, tokenizer, encoder, options
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # user and assistant messages, alternating
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self, user_text: str) -> list[int] | None:
        """The rendered conversation + the new user message + the assistant prompt, dropping the oldest
        exchanges until it fits the context with room for the answer (None when even the new one alone
        does not fit)."""
        turns = self.turns + [{"role": "user", "content": user_text}]
        while True:
            ids = chat_prompt_ids(self.encoder, self.system + turns, "conversation")
            if self.context is None or len(ids) + self.options["max_new_tokens"] <= self.context:
                return ids
            if len(turns) <= 1:
                return None
            turns = turns[2:]  # the oldest user message and its answer

    def reply(self, user_text: str, out) -> str | None:
        """Stream the answer to `out` and add the exchange to the conversation; None when stopped (Ctrl-C)."""
        from lorakit.eval import stream_generate

        ids = self.prompt_ids(user_text)
        if ids is None:
            out.write(f"(that message is too long for the model's context of {self.context} tokens)\n")
            return None
        pieces: list[str] = []
        out.write(ASSISTANT_PROMPT)
        out.flush()
        stream = None
        try:
            stream = stream_generate(self.model, self.tokenizer, ids, **self.options)
            for piece in stream:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # stops generation at the next token
            out.write("\n(stopped; this exchange is not kept)\n")
            return None
        out.write("\n")
        answer = "".join(pieces).strip()
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer
