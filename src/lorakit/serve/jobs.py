"""One HTTP generation request on the engine: n choices per prompt, each a Sequence, turned into text events.

The engine calls each sequence's callback on its own thread; the callback hands the output to the
request's asyncio loop (`call_soon_threadsafe`), where `events()` turns token ids into text pieces and
applies stop strings (text.py). Cancelling a job (the client went away, a stop string matched) cancels
its unfinished sequences; the engine frees their cache rows and adapter leases at its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from lorakit.serve.engine import Engine, Output, Sequence
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.text import TextState


class GenerationFailed(RuntimeError):
    """The engine could not finish a sequence (a failed step, or the server is stopping)."""


@dataclass
class Choice:
    seq: Sequence
    text: TextState
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class TextEvent:
    index: int  # the choice
    text: str  # new text (may be empty on the final event)
    finish_reason: str | None = None  # set on the choice's last event


class Job:
    def __init__(self, engine: Engine, tokenizer, adapter: str | None, prompts: list[list[int]],
                 params: SamplingParams, n: int, stop: list[str]) -> None:
        self.engine, self.adapter = engine, adapter
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.choices: list[Choice] = []
        for prompt in prompts:
            for j in range(n):
                # n choices of one prompt differ, each reproducibly when seeded
                choice_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                index = len(self.choices)
                seq = Sequence(prompt, adapter, choice_params, lambda out, i=index: self._deliver(i, out))
                self.choices.append(Choice(seq, TextState(tokenizer, stop)))
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def _deliver(self, index: int, output: Output) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, output))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def start(self) -> None:
        """Take the adapter leases, bring the adapter into host memory, queue every sequence. Raises (and holds
        nothing) when the adapter is unknown or cannot be loaded."""
        submitted = 0
        try:
            for i, choice in enumerate(self.choices):
                if self.adapter is not None:
                    self.engine.adapters.begin_request(self.adapter)
                    try:
                        if i == 0:
                            await run_in_threadpool(self.engine.adapters.ensure_host, self.adapter)
                        self.engine.submit(choice.seq)
                    except BaseException:
                        self.engine.adapters.end_request(self.adapter)
                        raise
                else:
                    self.engine.submit(choice.seq)
                submitted += 1
        except BaseException:
            for choice in self.choices[:submitted]:
                choice.finish_reason = "cancelled"
                self.engine.cancel(choice.seq)
            raise

    async def events(self) -> AsyncIterator[TextEvent]:
        remaining = len(self.choices)
        while remaining:
            index, output = await self.queue.get()
            choice = self.choices[index]
            if choice.finish_reason is not None:  # stopped by a stop string; the engine's late outputs are moot
                continue
            if output.error:
                raise GenerationFailed(output.error)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            piece = choice.text.add(output.tokens)
            choice.completion_tokens = output.completion_tokens
            if choice.text.stopped:
                choice.finish_reason = "stop"
                choice.completion_tokens = len(choice.text.ids)
                self.engine.cancel(choice.seq)
            elif output.finish_reason is not None:
                if output.finish_reason not in ("stop", "length"):
                    raise GenerationFailed(f"generation ended early ({output.finish_reason})")
                piece += choice.text.finish()
                choice.finish_reason = output.finish_reason
            if choice.finish_reason is not None:
                remaining -= 1
                yield TextEvent(index, piece, choice.finish_reason)
            elif piece:
                yield TextEvent(index, piece)

    def cancel(self) -> None:
        """Stop every unfinished choice (idempotent)."""
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "cancelled"
                self.engine.cancel(choice.seq)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def log_fields(self) -> dict:
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000, 1)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "choices": len(self.choices), "ttft_ms": ttft,
                "finish_reasons": sorted({c.finish_reason or "unfinished" for c in self.choices})}
